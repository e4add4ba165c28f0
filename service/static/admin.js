/* allot: the operator console (/admin). Sites, rounds, batches, live stats with a chart, the
 * pickup desk and desk tokens. The token is asked once and kept in sessionStorage (this tab's
 * session only). Signed in with a desk token, the console is in desk mode: only that site's
 * pickup desk and the assisted reservation form, in large type, for keyboard and scanner.
 */
(function () {
  'use strict';
  var A = window.Allot;
  var t = A.t;
  var el = A.el;
  var $ = A.$;

  var TOKEN_KEY = 'allot.admin.token';
  var DESK_SITE_KEY = 'allot.desk.site';
  var STATS_EVERY_MS = 1000;
  var FAIR_EVERY_MS = 3000; // the report reads the ledger: every few seconds is live enough
  var WINDOW_MS = 120000; // the charts show the last two minutes, now at the right edge
  var HISTORY = 150; // samples kept (one a second, a little more than the window)
  var SVG = 'http://www.w3.org/2000/svg';

  var state = {
    token: null,
    rounds: [],
    sites: {}, // site_id -> {name, district}
    statsRound: null,
    history: [],
    statsTimer: null,
    metricsAt: 0,
    queue: null,
    busyUntil: 0,
    role: null, // 'operator' or 'desk', from GET /api/v1/desk/me
    desk: null, // {token_id, site_id, label} in desk mode
    assisting: false,
    fairAt: 0,
  };
  // What desk mode hides: everything but the pickup desk and the assisted reservation form.
  var OPERATOR_ONLY = ['stats', 'batches', 'rounds', 'sites', 'desk-tokens'];

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (e) {
      return state.token;
    }
  }
  function setToken(value) {
    state.token = value;
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* kept in memory only */
    }
  }
  function admin(method, url, body, opts) {
    opts = opts || {};
    opts.token = token() || state.token;
    return A.api(method, url, body, opts).then(function (res) {
      if (res.status === 401) logout(t('token_expired'));
      return res;
    });
  }
  /** A console action: retried calmly while the service is busy, with a banner saying so. */
  function adminRetrying(method, url, body, opts) {
    return A.retrying(
      function () {
        return admin(method, url, body, opts);
      },
      function (kind, seconds) {
        var banner = $('busy-banner');
        banner.hidden = false;
        banner.textContent =
          kind === 'sending' ? t('sending_again') : t(kind === 'network' ? 'network_wait' : 'busy_wait', { n: seconds });
      }
    ).promise.then(function (res) {
      $('busy-banner').hidden = true;
      return res;
    });
  }
  function fmt(n) {
    if (n === null || n === undefined) return '—';
    return typeof n === 'number' ? n.toLocaleString(A.lang) : String(n);
  }
  function errorsList(res) {
    var data = res.data || {};
    var items = Array.isArray(data.errors)
      ? data.errors.map(function (e) {
          return el('li', {}, [el('code', { text: e.field }), ' ', e.message]);
        })
      : [];
    return items.length ? el('ul', { class: 'errors' }, items) : null;
  }
  function showBox(id, kind, title, nodes) {
    var box = A.clear($(id));
    box.className = 'result-box ' + kind;
    box.appendChild(el('p', { class: 'result-title', text: title }));
    (nodes || []).forEach(function (n) {
      if (n) box.appendChild(typeof n === 'string' ? el('p', { text: n }) : n);
    });
    box.hidden = false;
  }
  function problemText(res) {
    if (res.status === 0) return t('network_down');
    var d = res.data || {};
    return (d.title ? d.title + ': ' : '') + (d.detail || t('generic'));
  }

  // -- login ------------------------------------------------------------------------------------

  function logout(message) {
    setToken(null);
    clearTimeout(state.statsTimer);
    setMode(null, null);
    $('console').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    var err = $('token-error');
    err.hidden = !message;
    err.textContent = message || '';
    $('token').focus();
  }

  async function login(value) {
    setToken(value);
    // The operator token or a desk token answers 200 with what it is; a wrong one 401.
    var res = await adminRetrying('GET', '/api/v1/desk/me');
    if (res.status !== 200 || !res.data) {
      if (res.status !== 401) logout(problemText(res));
      return;
    }
    setMode(res.data.role, res.data.role === 'desk' ? res.data : null);
    $('login').hidden = true;
    $('console').hidden = false;
    $('logout').hidden = false;
    await loadRounds();
    if (state.role === 'desk') {
      showDeskSite();
      $('assist-cid').focus();
    } else {
      pollStats();
      loadDeskTokens();
    }
  }

  /** Operator mode shows every section; desk mode only the desk's two, in large type. */
  function setMode(role, desk) {
    state.role = role;
    state.desk = desk;
    var deskMode = role === 'desk';
    document.body.classList.toggle('desk-mode', deskMode);
    OPERATOR_ONLY.forEach(function (id) {
      $(id).hidden = deskMode;
    });
    document.querySelector('#console .tabs').hidden = deskMode;
    $('desk-banner').hidden = !deskMode;
    $('assist').hidden = !deskMode;
    $('desk-site-field').hidden = deskMode;
    $('desk-site').readOnly = deskMode;
    if (deskMode) $('desk-site').value = desk.site_id;
  }
  function showDeskSite() {
    var known = state.sites[state.desk.site_id];
    $('dm-site-name').textContent = known ? known.name : state.desk.site_id;
    $('dm-site-id').textContent = known ? state.desk.site_id : '';
    $('dm-label').textContent = state.desk.label;
  }

  // -- rounds and sites known to the console ----------------------------------------------------

  async function loadRounds() {
    var res = await A.api('GET', '/api/v1/rounds');
    if (res.status !== 200 || !res.data) return;
    state.rounds = res.data.rounds;
    await Promise.all(
      state.rounds.map(function (r) {
        return A.api('GET', '/api/v1/rounds/' + encodeURIComponent(r.round_id) + '/sites').then(function (s) {
          if (s.status === 200 && s.data) s.data.sites.forEach(noteSite);
        });
      })
    );
    renderRoundSelects();
    renderRoundTable();
    renderKnownSites();
  }
  function noteSite(s) {
    state.sites[s.site_id] = { name: s.name, district: s.district };
  }
  function renderKnownSites() {
    var list = A.clear($('known-sites'));
    Object.keys(state.sites)
      .sort()
      .forEach(function (id) {
        list.appendChild(el('option', { value: id, label: state.sites[id].name }));
      });
  }
  function pickRound() {
    var open = state.rounds.filter(function (r) {
      return r.status === 'open';
    });
    return (open[0] || state.rounds[state.rounds.length - 1] || {}).round_id || null;
  }
  function renderRoundSelects() {
    ['stats-round', 'batch-round', 'assist-round', 'batch-carry-from'].forEach(function (id) {
      var select = $(id);
      var current = select.value || (id === 'stats-round' ? state.statsRound : null) || pickRound();
      A.clear(select);
      state.rounds.forEach(function (r) {
        select.appendChild(el('option', { value: r.round_id, text: r.title + ' (' + r.round_id + ')' }));
      });
      if (current) select.value = current;
    });
    assistMode();
    if (!state.statsRound || $('stats-round').value !== state.statsRound) {
      state.statsRound = $('stats-round').value || null;
      state.history = [];
    }
    var feed = $('feed-link');
    if (state.statsRound) feed.href = '/api/v1/rounds/' + encodeURIComponent(state.statsRound) + '/sites.csv';
  }

  // -- stats ------------------------------------------------------------------------------------

  async function pollStats() {
    clearTimeout(state.statsTimer);
    if (!token() || state.role !== 'operator') return;
    var next = document.hidden ? STATS_EVERY_MS * 5 : STATS_EVERY_MS;
    var round = state.statsRound;
    if (round) {
      var res = await admin('GET', '/api/v1/admin/rounds/' + encodeURIComponent(round) + '/stats', null, {
        timeout: 5000,
      });
      if (round !== state.statsRound) {
        // the operator switched rounds while this one was in flight
      } else if (res.status === 200 && res.data) {
        await maybeQueue();
        await maybeFairness(round);
        addSample(res.data);
        $('stats-updated').textContent = t('stats_updated', { time: A.fmtClock(new Date()) });
      } else if (A.isBusy(res.status)) {
        $('stats-updated').textContent = t('stats_busy', { n: res.retryAfter || 2 });
        if (res.retryAfter) next = res.retryAfter * 1000;
      } else if (res.status === 404) {
        $('stats-updated').textContent = t('stats_no_round');
      }
    }
    if (token()) state.statsTimer = setTimeout(pollStats, next);
  }

  /** The fairness report, every few seconds: granted against asked per group, and the
   *  groups whose rate (granted / asked) is under 0.8 x the best group's of their dimension. */
  async function maybeFairness(round) {
    if (Date.now() - state.fairAt < FAIR_EVERY_MS) return;
    state.fairAt = Date.now();
    var res = await admin('GET', '/api/v1/admin/rounds/' + encodeURIComponent(round) + '/fairness', null, {
      timeout: 5000,
    });
    if (res.status === 200 && res.data && round === state.statsRound) renderFairness(res.data.groups || []);
  }
  function pct(x) {
    return (x * 100).toFixed(1) + '%';
  }
  function renderFairness(groups) {
    var best = {};
    groups.forEach(function (g) {
      if (g.asked > 0) best[g.dimension] = Math.max(best[g.dimension] || 0, g.granted / g.asked);
    });
    var table = A.clear($('fair-table'));
    table.appendChild(
      el('thead', {}, [
        el('tr', {}, [
          el('th', { scope: 'col', text: t('fair_dimension') }),
          el('th', { scope: 'col', text: t('fair_group') }),
          el('th', { scope: 'col', class: 'num', text: t('fair_asked') }),
          el('th', { scope: 'col', class: 'num', text: t('fair_granted') }),
          el('th', { scope: 'col', class: 'num', text: t('fair_rate') }),
          el('th', { scope: 'col', class: 'num', text: t('fair_share_asked') }),
          el('th', { scope: 'col', class: 'num', text: t('fair_share_granted') }),
          el('th', { scope: 'col' }),
        ]),
      ])
    );
    var body = el('tbody');
    groups.forEach(function (g) {
      var rate = g.asked > 0 ? g.granted / g.asked : null;
      var under = rate !== null && best[g.dimension] > 0 && rate < 0.8 * best[g.dimension];
      body.appendChild(
        el('tr', { class: under ? 'under' : null, 'data-group': g.dimension + ':' + g.group }, [
          el('td', { text: t('fair_dim_' + g.dimension) }),
          el('td', { text: g.dimension === 'channel' ? t('fair_ch_' + g.group.replace('-', '_')) : g.group }),
          el('td', { class: 'num', text: fmt(g.asked) }),
          el('td', { class: 'num', text: fmt(g.granted) }),
          el('td', { class: 'num', text: rate === null ? '—' : pct(rate) }),
          el('td', { class: 'num', text: pct(g.share_of_asked) }),
          el('td', { class: 'num', text: pct(g.share_of_granted) }),
          el('td', { class: 'flag', text: under ? t('fair_under') : '' }),
        ])
      );
    });
    if (!groups.length) body.appendChild(el('tr', {}, [el('td', { colspan: 8, text: t('fair_none') })]));
    table.appendChild(body);
  }

  /** The admission queue's depth (all workers summed), every other second. /metrics is on the
   *  operations port, out of a browser's reach; this operator endpoint gives the one figure. */
  async function maybeQueue() {
    if (Date.now() - state.metricsAt < 1900) return;
    state.metricsAt = Date.now();
    var res = await admin('GET', '/api/v1/admin/queue', null, { timeout: 3000 });
    if (res.status !== 200 || !res.data || typeof res.data.queue_depth !== 'number') return;
    state.queue = res.data.queue_depth;
  }

  function addSample(s) {
    var at = Date.now();
    var prev = state.history[state.history.length - 1];
    var rate = null;
    if (prev && at > prev.at) rate = Math.max(0, ((s.reservations - prev.live) * 1000) / (at - prev.at));
    state.history.push({
      at: at,
      reserved: s.reserved,
      collected: s.collected,
      remaining: s.remaining,
      loaded: s.loaded,
      live: s.reservations,
      rate: rate,
    });
    if (state.history.length > HISTORY) state.history.shift();
    showLost(s.lost);
    $('n-loaded').textContent = fmt(s.loaded);
    $('n-reserved').textContent = fmt(s.reserved);
    $('n-collected').textContent = fmt(s.collected);
    $('n-remaining').textContent = fmt(s.remaining);
    $('n-expired').textContent = fmt(s.expired);
    $('n-carried-out').textContent = fmt(s.carried_out);
    $('n-live').textContent = fmt(s.reservations);
    $('n-rate').textContent = rate === null ? '—' : rate >= 10 ? fmt(Math.round(rate)) : rate.toFixed(1);
    var lag = s.ledger || {};
    $('n-lag').textContent =
      lag.recorded === null ? fmt(lag.lag) + ' · ' + t('ledger_down') : fmt(lag.lag);
    $('n-queue').textContent = fmt(state.queue);
    drawChart(
      $('chart-units'),
      $('legend-units'),
      [
        { key: 'reserved', label: t('stat_reserved'), color: '#1d4ed8' },
        { key: 'collected', label: t('stat_collected'), color: '#047857' },
        { key: 'remaining', label: t('stat_remaining'), color: '#b45309' },
      ],
      0
    );
    drawChart($('chart-rate'), $('legend-rate'), [{ key: 'rate', label: t('stat_rate'), color: '#7c3aed' }], 1);
    renderSiteTable(s.sites || []);
    var lottery = typeof s.entries === 'number';
    $('lottery-box').hidden = !lottery;
    if (lottery) {
      $('n-entries').textContent = fmt(s.entries);
      loadDraw(s.round_id);
    }
  }

  // -- lottery: freeze status, the draw, passes, the record -------------------------------------

  async function loadDraw(roundId) {
    if (Date.now() - (state.drawAt || 0) < 1900 && state.drawRound === roundId) return;
    state.drawAt = Date.now();
    state.drawRound = roundId;
    var res = await A.api('GET', '/api/v1/rounds/' + encodeURIComponent(roundId) + '/draw');
    if (res.status === 200 && res.data) renderDraw(res.data);
  }

  function renderDraw(rec) {
    $('draw-status').textContent = t('draw_status_' + rec.status);
    $('draw-source').textContent = t('draw_source', { source: rec.public_randomness_source });
    $('draw-submit').disabled = rec.status !== 'frozen' && rec.status !== 'drawing';
    $('draw-next').disabled = rec.status !== 'drawn';
    if (rec.public_randomness && !$('draw-randomness').value) $('draw-randomness').value = rec.public_randomness;
    var rows = [
      ['commitment', rec.commitment],
      ['frozen_at', rec.frozen_at],
      ['entries', rec.entries],
      ['entries_digest', rec.entries_digest],
      ['stock_digest', rec.stock_digest],
      ['secret', rec.secret],
      ['public_randomness', rec.public_randomness],
      ['seed', rec.seed],
      ['drawn_at', rec.drawn_at],
      ['results_digest', rec.results_digest],
    ];
    (rec.passes || []).forEach(function (p) {
      var units = (p.released || []).map(function (x) {
        return x.site_id + ' +' + x.units;
      });
      rows.push(['pass ' + p.pass, (units.join(', ') || '—') + ' · ' + p.digest]);
    });
    renderDrawFiles(rec);
    var table = A.clear($('draw-table'));
    var body = el('tbody');
    rows.forEach(function (r) {
      body.appendChild(
        el('tr', {}, [
          el('th', { scope: 'row' }, [el('code', { text: r[0] })]),
          el('td', { class: 'mono', text: r[1] === null || r[1] === undefined ? '—' : String(r[1]) }),
        ])
      );
    });
    table.appendChild(body);
  }

  /** Links to the draw record and each published file, once it exists (API.md). */
  function renderDrawFiles(rec) {
    var base = '/api/v1/rounds/' + encodeURIComponent(rec.round_id) + '/draw';
    var files = [['draw.json', base]];
    if (rec.status !== 'registering') files.push(['entries.csv', base + '/entries.csv'], ['stock.csv', base + '/stock.csv']);
    if (rec.results_digest) files.push(['results.csv', base + '/results.csv']);
    (rec.passes || []).forEach(function (p) {
      files.push(['pass-' + p.pass + '.csv', base + '/pass-' + p.pass + '.csv']);
    });
    var box = A.clear($('draw-files'));
    files.forEach(function (f, i) {
      if (i) box.appendChild(document.createTextNode(' · '));
      box.appendChild(el('a', { href: f[1], text: f[0], target: '_blank', rel: 'noopener' }));
    });
  }

  async function postDraw(next) {
    var round = state.statsRound;
    if (!round) return;
    var url = '/api/v1/admin/rounds/' + encodeURIComponent(round) + '/draw' + (next ? '/next' : '');
    var body = next ? null : { public_randomness: $('draw-randomness').value };
    var res = await adminRetrying('POST', url, body);
    if (res.status === 200 || res.status === 202) {
      renderDraw(res.data);
      showBox('draw-result', 'ok', t(res.status === 200 ? 'draw_done' : 'draw_running'));
    } else {
      showBox('draw-result', 'bad', problemText(res), [errorsList(res)]);
    }
    state.drawAt = 0;
  }

  /** Redis has lost data of this round that the ledger has: say so plainly, and what to do. */
  function showLost(lost) {
    var box = $('lost-banner');
    box.hidden = !lost;
    if (!lost) return;
    box.textContent = t('stats_lost', {
      round: lost.round_id,
      since: A.fmtClock(new Date(lost.since)),
      redis: fmt(lost.redis_seq),
      ledger: fmt(lost.ledger_seq),
    });
  }

  function svgEl(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) {
      node.setAttribute(k, String(attrs[k]));
    });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** The smallest 1, 2 or 5 times a power of ten at or above v. */
  function niceMax(v) {
    if (v <= 1) return 1;
    var p = Math.pow(10, Math.floor(Math.log(v) / Math.LN10));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  /** Lines over the last two minutes, scaled to a round number above the largest value. */
  function drawChart(svg, legend, series, floorMax) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var W = 600;
    var H = 170;
    var left = 56;
    var right = 8;
    var top = 10;
    var bottom = 24;
    var end = Date.now();
    var h = state.history.filter(function (p) {
      return p.at >= end - WINDOW_MS;
    });
    var max = floorMax;
    h.forEach(function (p) {
      series.forEach(function (s) {
        if (p[s.key] !== null && p[s.key] > max) max = p[s.key];
      });
    });
    max = niceMax(max);
    function x(at) {
      return left + (1 - (end - at) / WINDOW_MS) * (W - left - right);
    }
    function y(v) {
      return top + (1 - v / max) * (H - top - bottom);
    }
    svg.appendChild(svgEl('rect', { x: left, y: top, width: W - left - right, height: H - top - bottom, fill: '#f8fafc', stroke: '#cbd5e1' }));
    [0, 0.5, 1].forEach(function (f) {
      var v = max * f;
      svg.appendChild(svgEl('line', { x1: left, x2: W - right, y1: y(v), y2: y(v), stroke: '#e2e8f0' }));
      svg.appendChild(
        svgEl('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end', 'font-size': 12, fill: '#334155' }, fmt(v))
      );
    });
    svg.appendChild(svgEl('text', { x: left, y: H - 6, 'font-size': 12, fill: '#334155' }, t('chart_ago', { n: Math.round(WINDOW_MS / 60000) })));
    svg.appendChild(svgEl('text', { x: W - right, y: H - 6, 'text-anchor': 'end', 'font-size': 12, fill: '#334155' }, t('chart_now')));
    series.forEach(function (s) {
      var pts = h
        .filter(function (p) {
          return p[s.key] !== null;
        })
        .map(function (p) {
          return x(p.at).toFixed(1) + ',' + y(p[s.key]).toFixed(1);
        });
      if (pts.length) {
        svg.appendChild(svgEl('polyline', { points: pts.join(' '), fill: 'none', stroke: s.color, 'stroke-width': 2.5, 'stroke-linejoin': 'round' }));
      }
    });
    A.clear(legend);
    series.forEach(function (s) {
      legend.appendChild(el('span', { class: 'key' }, [el('span', { class: 'swatch', 'data-color': s.color }), s.label]));
    });
    legend.querySelectorAll('.swatch').forEach(function (sw) {
      sw.style.background = sw.getAttribute('data-color');
    });
  }

  function renderSiteTable(sites) {
    var table = A.clear($('site-table'));
    var lottery = sites.some(function (s) {
      return typeof s.entries === 'number';
    });
    table.appendChild(
      el('thead', {}, [
        el('tr', {}, [
          el('th', { scope: 'col', text: 'site_id' }),
          el('th', { scope: 'col', text: t('site_name_col') }),
          el('th', { scope: 'col', class: 'num', text: t('stat_loaded') }),
          el('th', { scope: 'col', class: 'num', text: t('stat_reserved') }),
          el('th', { scope: 'col', class: 'num', text: t('stat_collected') }),
          el('th', { scope: 'col', class: 'num', text: t('stat_expired') }),
          el('th', { scope: 'col', class: 'num', text: t('stat_carried_out') }),
          el('th', { scope: 'col', class: 'num', text: t('stat_remaining') }),
          lottery ? el('th', { scope: 'col', class: 'num', text: t('stat_entries') }) : null,
        ]),
      ])
    );
    var body = el('tbody');
    sites.forEach(function (s) {
      var known = state.sites[s.site_id];
      body.appendChild(
        el('tr', {}, [
          el('td', {}, [el('code', { text: s.site_id })]),
          el('td', { text: known ? known.name : '' }),
          el('td', { class: 'num', text: fmt(s.loaded) }),
          el('td', { class: 'num', text: fmt(s.reserved) }),
          el('td', { class: 'num', text: fmt(s.collected) }),
          el('td', { class: 'num', text: fmt(s.expired) }),
          el('td', { class: 'num', text: fmt(s.carried_out) }),
          el('td', { class: 'num', text: fmt(s.remaining) }),
          lottery ? el('td', { class: 'num', text: fmt(s.entries || 0) }) : null,
        ])
      );
    });
    table.appendChild(body);
  }

  // -- pickup desk ------------------------------------------------------------------------------

  function normaliseCode(raw) {
    return String(raw || '')
      .toUpperCase()
      .replace(/[\s-]+/g, '');
  }

  async function collect(ev) {
    ev.preventDefault();
    var site = $('desk-site').value.trim();
    var code = normaliseCode($('desk-code').value);
    var cid = A.normaliseCitizenId($('desk-cid').value);
    if (!site) {
      deskAnswer('bad', t('desk_need_site'));
      $('desk-site').focus();
      return;
    }
    if (!code) {
      deskAnswer('bad', t('desk_need_code'));
      $('desk-code').focus();
      return;
    }
    if (cid && A.citizenIdProblem(cid)) {
      deskAnswer('bad', t(A.citizenIdProblem(cid)));
      $('desk-cid').focus();
      return;
    }
    try {
      sessionStorage.setItem(DESK_SITE_KEY, site);
    } catch (e) {
      /* remembered for this page only */
    }
    var body = { site_id: site, pickup_code: code };
    if (cid) body.citizen_id = cid;
    $('desk-submit').disabled = true;
    var res = await adminRetrying('POST', '/api/v1/admin/pickups', body);
    $('desk-submit').disabled = false;
    var d = res.data || {};
    var detail = d.detail || '';
    // 409 not-collectable names the state in its detail: "This reservation is cancelled and …"
    var state409 = /\bis (collected|cancelled|expired)\b/.exec(detail);
    var why = d.reason || (state409 ? state409[1] : null);
    if (res.status === 200) {
      deskAnswer('ok', t('desk_ok', { n: d.quantity }), [
        t('desk_ok_detail', { code: d.pickup_code, masked: d.citizen_id_masked }),
      ], code);
    } else if (res.status === 404) {
      deskAnswer('bad', t('desk_not_here'), [t('desk_not_here_hint')], code);
    } else if (res.status === 409 && /does not match|ID number/i.test(detail)) {
      deskAnswer('bad', t('desk_wrong_person'), [t('desk_wrong_person_hint')], code);
    } else if (res.status === 409 && why === 'collected') {
      deskAnswer('bad', t('desk_already'), [t('desk_already_hint')], code);
    } else if (res.status === 409 && why === 'cancelled') {
      deskAnswer('bad', t('desk_cancelled'), [t('desk_cancelled_hint')], code);
    } else if (res.status === 409 && why === 'expired') {
      deskAnswer('bad', t('desk_expired'), [t('desk_expired_hint')], code);
    } else if (res.status === 422) {
      deskAnswer('bad', t('desk_bad_input'), [errorsList(res)], code);
    } else if (res.status === 403) {
      deskAnswer('bad', t('desk_forbidden'), [], code);
    } else if (res.status !== 401) {
      deskAnswer('bad', t('generic_title'), [problemText(res)], code);
    }
    $('desk-code').value = '';
    $('desk-cid').value = '';
    $('desk-code').focus();
  }

  function deskAnswer(kind, title, lines, code) {
    var box = A.clear($('desk-result'));
    box.className = 'desk-result ' + kind;
    box.appendChild(el('p', { class: 'desk-big', 'data-testid': 'desk-verdict', text: (kind === 'ok' ? '✓ ' : '✗ ') + title }));
    (lines || []).forEach(function (l) {
      if (l) box.appendChild(typeof l === 'string' ? el('p', { text: l }) : l);
    });
    box.hidden = false;
    if (code) {
      var log = $('desk-log');
      log.insertBefore(
        el('li', { class: kind }, [A.fmtClock(new Date()) + '  ', el('code', { text: code }), '  ' + title]),
        log.firstChild
      );
      while (log.children.length > 10) log.removeChild(log.lastChild);
    }
  }

  // -- assisted reservation (desk mode) ---------------------------------------------------------

  function assistFieldError(id, key) {
    var box = $(id + '-error');
    box.hidden = !key;
    box.textContent = key ? t(key) : '';
    $(id).setAttribute('aria-invalid', key ? 'true' : 'false');
  }
  /** The round chosen in the assisted form, and whether it is a lottery (then: register). */
  function assistRound() {
    var id = $('assist-round').value;
    return (
      state.rounds.filter(function (r) {
        return r.round_id === id;
      })[0] || null
    );
  }
  function assistMode() {
    var r = assistRound();
    var lottery = !!r && r.mode === 'lottery';
    $('assist-submit').textContent = t(lottery ? 'assist_enter_submit' : 'assist_submit');
    return lottery;
  }
  function assistReady() {
    $('assist-cid').value = '';
    $('assist-phone').value = '';
    $('assist-cid').focus();
  }

  async function assist(ev) {
    ev.preventDefault();
    if (state.assisting || !state.desk) return;
    var cid = A.normaliseCitizenId($('assist-cid').value);
    var ph = A.normalisePhone($('assist-phone').value);
    var cidBad = A.citizenIdProblem(cid);
    var phoneBad = A.phoneProblem(ph);
    assistFieldError('assist-cid', cidBad);
    assistFieldError('assist-phone', phoneBad);
    if (cidBad || phoneBad) {
      $(cidBad ? 'assist-cid' : 'assist-phone').focus();
      return;
    }
    var round = $('assist-round').value;
    if (!round) {
      assistAnswer('bad', t('need_round'));
      return;
    }
    var lottery = assistMode();
    var url = '/api/v1/desk/rounds/' + encodeURIComponent(round) + (lottery ? '/entries' : '/reservations');
    state.assisting = true;
    $('assist-submit').disabled = true;
    A.clear($('assist-result')).hidden = true; // never the last citizen's code by this form
    var res = await adminRetrying('POST', url, { citizen_id: cid, phone: ph, site_id: state.desk.site_id });
    state.assisting = false;
    $('assist-submit').disabled = false;
    var d = res.data || {};
    if ((res.status === 201 || res.status === 200) && lottery) {
      assistAnswer('ok', t(res.status === 200 ? 'assist_entered_existing' : 'assist_entered'), [
        t('assist_entered_detail', { masked: d.citizen_id_masked, receipt: (d.receipt || '').slice(0, 12) }),
      ]);
    } else if (res.status === 201 || res.status === 200) {
      showAssisted(d, res.status === 200);
    } else if (res.status === 409 && d.code === 'already-entered') {
      assistAnswer('bad', t('assist_already_entered'), [t('assist_already_entered_hint')]);
    } else if (res.status === 409 && d.code === 'wrong-mode') {
      assistAnswer('bad', t('generic_title'), [problemText(res)]);
      loadRounds();
    } else if (res.status === 409 && d.code === 'sold-out') {
      var alts = (d.alternatives || []).map(function (a) {
        return a.name + ' (' + a.district + ', ' + fmt(a.remaining) + ')';
      });
      assistAnswer('bad', t('assist_sold_out'), alts.length ? [t('assist_sold_out_alts', { sites: alts.join(' · ') })] : []);
    } else if (res.status === 409 && d.code === 'already-reserved') {
      assistAnswer('bad', t('assist_already'), [t('assist_already_hint')]);
    } else if (res.status === 409 && d.code === 'round-not-open') {
      assistAnswer('bad', t('assist_not_open'));
      loadRounds();
    } else if (res.status === 404) {
      assistAnswer('bad', t('assist_gone'));
      loadRounds();
    } else if (res.status === 422) {
      var fields = (d.errors || []).map(function (e) {
        return e.field;
      });
      if (fields.indexOf('citizen_id') >= 0) assistFieldError('assist-cid', 'cid_err_server');
      if (fields.indexOf('phone') >= 0) assistFieldError('assist-phone', 'phone_err_format');
      assistAnswer('bad', t('desk_bad_input'), [errorsList(res)]);
      $(fields.indexOf('citizen_id') >= 0 || fields.indexOf('phone') < 0 ? 'assist-cid' : 'assist-phone').focus();
      return;
    } else if (res.status === 403) {
      assistAnswer('bad', t('desk_forbidden'));
    } else if (res.status !== 401) {
      assistAnswer('bad', t('generic_title'), [problemText(res)]);
    }
    assistReady();
  }

  function assistAnswer(kind, title, lines) {
    var box = A.clear($('assist-result'));
    box.className = 'desk-result ' + kind;
    box.appendChild(el('p', { class: 'desk-big', 'data-testid': 'assist-verdict', text: (kind === 'ok' ? '✓ ' : '✗ ') + title }));
    (lines || []).forEach(function (l) {
      if (l) box.appendChild(typeof l === 'string' ? el('p', { text: l }) : l);
    });
    box.hidden = false;
  }

  /** The code and its QR, big enough to read across the counter, and one key to hand over. */
  function showAssisted(r, existing) {
    var box = A.clear($('assist-result'));
    box.className = 'desk-result ok';
    box.appendChild(el('p', { class: 'desk-big', 'data-testid': 'assist-verdict', text: '✓ ' + t(existing ? 'assist_existing' : 'assist_ok') }));
    box.appendChild(
      el('div', { class: 'assist-code' }, [
        el('p', { class: 'pickup-code-big', 'data-testid': 'assist-code', text: r.pickup_code }),
        el('img', {
          class: 'assist-qr',
          src: '/api/v1/reservations/' + encodeURIComponent(r.reservation_id) + '/qr.svg',
          alt: t('assist_qr_alt', { code: r.pickup_code }),
          width: 180,
          height: 180,
        }),
      ])
    );
    box.appendChild(el('p', { text: t('assist_ok_detail', { masked: r.citizen_id_masked, n: r.quantity, window: A.fmtRange(r.pickup_start, r.pickup_end) }) }));
    if (r.status === 'confirmed') {
      box.appendChild(
        el('button', {
          type: 'button',
          class: 'secondary big',
          'data-testid': 'assist-hand-over',
          text: t('assist_hand_over'),
          onclick: function () {
            handOver(r.pickup_code);
          },
        })
      );
    }
    box.hidden = false;
  }

  async function handOver(code) {
    $('desk-code').value = code;
    $('desk-cid').value = '';
    await collect({ preventDefault: function () {} });
    assistReady();
  }

  // -- desk tokens (operator) -------------------------------------------------------------------

  async function loadDeskTokens() {
    var res = await admin('GET', '/api/v1/admin/desk-tokens');
    if (res.status !== 200 || !res.data) return;
    var table = A.clear($('dt-table'));
    table.appendChild(
      el('thead', {}, [
        el('tr', {}, [
          el('th', { scope: 'col', text: 'site_id' }),
          el('th', { scope: 'col', text: t('dt_label') }),
          el('th', { scope: 'col', text: t('round_status_col') }),
          el('th', { scope: 'col' }),
        ]),
      ])
    );
    var body = el('tbody');
    res.data.desk_tokens.forEach(function (d) {
      body.appendChild(
        el('tr', { 'data-token-id': d.token_id }, [
          el('td', {}, [el('code', { text: d.site_id })]),
          el('td', { text: d.label }),
          el('td', { text: d.revoked_at ? t('dt_revoked_at', { time: A.fmtTime(d.revoked_at) }) : t('dt_active') }),
          el('td', {}, [
            d.revoked_at
              ? null
              : el('button', {
                  type: 'button',
                  class: 'link',
                  'aria-label': t('dt_revoke_one', { label: d.label, site: d.site_id }),
                  text: t('dt_revoke'),
                  onclick: function () {
                    revokeDeskToken(d);
                  },
                }),
          ]),
        ])
      );
    });
    if (!res.data.desk_tokens.length) body.appendChild(el('tr', {}, [el('td', { colspan: 4, text: t('dt_none') })]));
    table.appendChild(body);
  }

  async function createDeskToken(ev) {
    ev.preventDefault();
    var body = { site_id: $('dt-site').value.trim(), label: $('dt-label').value.trim() };
    $('dt-submit').disabled = true;
    var res = await adminRetrying('POST', '/api/v1/admin/desk-tokens', body);
    $('dt-submit').disabled = false;
    if (res.status === 201 && res.data) {
      showBox('dt-result', 'ok', t('dt_created', { label: res.data.label, site: res.data.site_id }), [
        el('p', {}, [el('code', { class: 'token-once', 'data-testid': 'dt-token', text: res.data.token })]),
        t('dt_created_hint'),
      ]);
      $('dt-label').value = '';
      loadDeskTokens();
    } else if (res.status === 422) {
      showBox('dt-result', 'bad', t('dt_invalid'), [errorsList(res)]);
    } else if (res.status !== 401) {
      showBox('dt-result', 'bad', t('generic_title'), [problemText(res)]);
    }
  }

  async function revokeDeskToken(d) {
    if (!window.confirm(t('dt_revoke_confirm', { label: d.label, site: d.site_id }))) return;
    var res = await adminRetrying('DELETE', '/api/v1/admin/desk-tokens/' + encodeURIComponent(d.token_id));
    if (res.status === 200) showBox('dt-result', 'info', t('dt_revoked', { label: d.label, site: d.site_id }));
    else if (res.status !== 401) showBox('dt-result', 'bad', t('generic_title'), [problemText(res)]);
    loadDeskTokens();
  }

  // -- batches ----------------------------------------------------------------------------------

  function newBatchId() {
    var d = new Date();
    function two(n) {
      return n < 10 ? '0' + n : String(n);
    }
    return (
      'batch-' + d.getFullYear() + two(d.getMonth() + 1) + two(d.getDate()) + '-' +
      two(d.getHours()) + two(d.getMinutes()) + two(d.getSeconds())
    );
  }
  function batchMode() {
    var checked = document.querySelector('input[name="batch_mode"]:checked');
    return checked ? checked.value : 'csv';
  }
  function addBatchRow(siteId, qty) {
    var n = $('batch-rows').children.length + 1;
    var row = el('tr', {}, [
      el('td', {}, [
        el('input', { class: 'row-site', list: 'known-sites', 'aria-label': 'site_id ' + n, value: siteId || '', autocomplete: 'off' }),
      ]),
      el('td', {}, [
        el('input', { class: 'row-qty', type: 'number', min: 1, step: 1, 'aria-label': t('batch_quantity') + ' ' + n, value: qty || '' }),
      ]),
      el('td', {}, [
        el('button', {
          type: 'button',
          class: 'link',
          text: t('batch_remove_row'),
          onclick: function () {
            row.parentNode.removeChild(row);
          },
        }),
      ]),
    ]);
    $('batch-rows').appendChild(row);
  }

  async function loadBatch(ev) {
    ev.preventDefault();
    var round = $('batch-round').value;
    var batchId = $('batch-id').value.trim();
    if (!round) return showBox('batch-result', 'bad', t('need_round'));
    if (!/^[a-z0-9_-]{1,64}$/.test(batchId)) return showBox('batch-result', 'bad', t('batch_id_bad'));
    var url = '/api/v1/admin/rounds/' + encodeURIComponent(round) + '/batches';
    var res;
    $('batch-submit').disabled = true;
    if (batchMode() === 'carry') {
      // a carry-over: the earlier round's leftovers (remaining + expired) go to this round
      var from = $('batch-carry-from').value;
      if (!from || from === round) {
        $('batch-submit').disabled = false;
        return showBox('batch-result', 'bad', t('batch_carry_same'));
      }
      res = await adminRetrying('POST', url, { batch_id: batchId, carry_from: from });
    } else if (batchMode() === 'csv') {
      var text = $('batch-csv').value.trim();
      if (!text) {
        $('batch-submit').disabled = false;
        return showBox('batch-result', 'bad', t('batch_empty'));
      }
      res = await adminRetrying('POST', url + '?batch_id=' + encodeURIComponent(batchId), text + '\n');
    } else {
      var items = [];
      document.querySelectorAll('#batch-rows tr').forEach(function (tr) {
        var s = tr.querySelector('.row-site').value.trim();
        var q = tr.querySelector('.row-qty').value;
        if (s || q) items.push({ site_id: s, quantity: q === '' ? null : Number(q) });
      });
      if (!items.length) {
        $('batch-submit').disabled = false;
        return showBox('batch-result', 'bad', t('batch_empty'));
      }
      res = await adminRetrying('POST', url, { batch_id: batchId, items: items });
    }
    $('batch-submit').disabled = false;
    var d = res.data || {};
    var idLine = el('p', {}, [t('batch_id_label') + ': ', el('code', { 'data-testid': 'batch-id', text: d.batch_id || batchId })]);
    var carried = d.carried_from ? [t('batch_carried', { round: d.carried_from })] : [];
    if (res.status === 201) {
      showBox('batch-result', 'ok', t('batch_loaded'), [
        idLine,
        t('batch_counts', { units: fmt(d.units_added), sites: fmt(d.sites) }),
      ].concat(carried, [t('batch_next_hint')]));
      pollStats();
    } else if (res.status === 200) {
      showBox('batch-result', 'info', t('batch_replayed'), [
        idLine,
        t('batch_counts', { units: fmt(d.units_added), sites: fmt(d.sites) }),
      ].concat(carried, [t('batch_replayed_hint')]));
    } else if (res.status === 409 && d.code === 'carry-not-ready') {
      showBox('batch-result', 'bad', t('batch_carry_not_ready'), [problemText(res)]);
    } else if (res.status === 409) {
      showBox('batch-result', 'bad', t('batch_conflict'), [idLine, t('batch_conflict_hint')]);
    } else if (res.status === 422) {
      showBox('batch-result', 'bad', t('batch_invalid'), [errorsList(res)]);
    } else if (res.status !== 401) {
      showBox('batch-result', 'bad', t('generic_title'), [problemText(res)]);
    }
  }

  // -- rounds -----------------------------------------------------------------------------------

  function browserOffset() {
    var m = -new Date().getTimezoneOffset();
    var sign = m >= 0 ? '+' : '-';
    m = Math.abs(m);
    function two(n) {
      return n < 10 ? '0' + n : String(n);
    }
    return sign + two(Math.floor(m / 60)) + ':' + two(m % 60);
  }
  function localInput(date) {
    function two(n) {
      return n < 10 ? '0' + n : String(n);
    }
    return (
      date.getFullYear() + '-' + two(date.getMonth() + 1) + '-' + two(date.getDate()) + 'T' +
      two(date.getHours()) + ':' + two(date.getMinutes())
    );
  }
  function resetRoundForm() {
    var start = new Date(Date.now() + 3600000);
    start.setMinutes(0, 0, 0);
    $('rf-id').value = '';
    $('rf-id').readOnly = false;
    $('rf-title').value = '';
    $('rf-opens').value = localInput(start);
    $('rf-closes').value = localInput(new Date(start.getTime() + 86400000));
    $('rf-pstart').value = localInput(start);
    $('rf-pend').value = localInput(new Date(start.getTime() + 7 * 86400000));
    $('rf-per').value = 5;
    $('rf-offset').value = browserOffset();
    $('rf-mode-fcfs').checked = true;
    $('rf-source').value = '';
    $('rf-loss').checked = false;
    $('rf-programme').value = '';
    $('rf-cooldown').value = 0;
    fillEligibility(null);
    showRoundMode();
    $('round-form-title').textContent = t('round_new');
  }
  /** The lottery's own fields are shown for a lottery round only. */
  function showRoundMode() {
    $('rf-lottery-box').hidden = !$('rf-mode-lottery').checked;
  }
  function fillEligibility(e) {
    e = e || {};
    $('rf-digits').value = (e.birth_year_last_digit || []).join(',');
    $('rf-regions').value = (e.regions || []).join(',');
    $('rf-min-age').value = e.min_age === undefined || e.min_age === null ? '' : e.min_age;
    $('rf-max-age').value = e.max_age === undefined || e.max_age === null ? '' : e.max_age;
    $('rf-eligibility').open = !!(e.birth_year_last_digit || e.regions || e.min_age != null || e.max_age != null);
  }
  /** The eligibility object from the form, or null (anyone). What is not a digit or a whole
   * number is sent as typed, so that the service's 422 names the field. */
  function eligibilityFromForm() {
    function list(id) {
      return $(id)
        .value.split(/[,\s\u3001\uff0c]+/)
        .filter(function (x) {
          return x !== '';
        });
    }
    function whole(id) {
      var v = $(id).value.trim();
      return /^\d+$/.test(v) ? Number(v) : v;
    }
    var e = {};
    var digits = list('rf-digits');
    if (digits.length)
      e.birth_year_last_digit = digits.map(function (d) {
        return /^\d$/.test(d) ? Number(d) : d;
      });
    var regions = list('rf-regions');
    if (regions.length) e.regions = regions;
    if ($('rf-min-age').value.trim() !== '') e.min_age = whole('rf-min-age');
    if ($('rf-max-age').value.trim() !== '') e.max_age = whole('rf-max-age');
    return Object.keys(e).length ? e : null;
  }
  function editRound(r) {
    var m = /([+-]\d\d:\d\d|Z)$/.exec(r.opens_at);
    $('rf-id').value = r.round_id;
    $('rf-id').readOnly = true;
    $('rf-title').value = r.title;
    $('rf-opens').value = r.opens_at.slice(0, 16);
    $('rf-closes').value = r.closes_at.slice(0, 16);
    $('rf-pstart').value = r.pickup_start.slice(0, 16);
    $('rf-pend').value = r.pickup_end.slice(0, 16);
    $('rf-per').value = r.per_person;
    $('rf-offset').value = m ? (m[1] === 'Z' ? '+00:00' : m[1]) : browserOffset();
    $(r.mode === 'lottery' ? 'rf-mode-lottery' : 'rf-mode-fcfs').checked = true;
    $('rf-source').value = (r.draw && r.draw.public_randomness_source) || '';
    // the Round does not carry loss_weighting (API.md): the box starts unticked; on an opened
    // round a different value is refused (422 naming the field), so nothing changes unseen
    $('rf-loss').checked = false;
    $('rf-programme').value = r.programme || '';
    $('rf-cooldown').value = r.cooldown_days || 0;
    fillEligibility(r.eligibility);
    showRoundMode();
    $('round-form-title').textContent = t('round_edit', { id: r.round_id });
    $('rf-title').focus();
  }
  function renderRoundTable() {
    var table = A.clear($('round-table'));
    table.appendChild(
      el('thead', {}, [
        el('tr', {}, [
          el('th', { scope: 'col', text: 'round_id' }),
          el('th', { scope: 'col', text: t('rf_title') }),
          el('th', { scope: 'col', text: t('round_status_col') }),
          el('th', { scope: 'col', text: t('rf_mode') }),
          el('th', { scope: 'col', text: t('rf_opens') }),
          el('th', { scope: 'col', class: 'num', text: t('stat_remaining') }),
          el('th', { scope: 'col' }),
        ]),
      ])
    );
    var body = el('tbody');
    state.rounds.forEach(function (r) {
      body.appendChild(
        el('tr', {}, [
          el('td', {}, [el('code', { text: r.round_id })]),
          el('td', { text: r.title }),
          el('td', { text: t('round_' + r.status) }),
          el('td', { text: t(r.mode === 'lottery' ? 'rf_mode_lottery' : 'rf_mode_fcfs') }),
          el('td', { text: A.fmtTime(r.opens_at) }),
          el('td', { class: 'num', text: fmt(r.remaining) }),
          el('td', {}, [
            el('button', {
              type: 'button',
              class: 'link',
              'aria-label': t('round_edit', { id: r.round_id }),
              text: t('edit'),
              onclick: function () {
                editRound(r);
              },
            }),
          ]),
        ])
      );
    });
    if (!state.rounds.length) body.appendChild(el('tr', {}, [el('td', { colspan: 7, text: t('no_rounds') })]));
    table.appendChild(body);
  }
  async function saveRound(ev) {
    ev.preventDefault();
    var id = $('rf-id').value.trim();
    var offset = $('rf-offset').value.trim();
    if (!/^[a-z0-9_-]{1,64}$/.test(id)) return showBox('round-result', 'bad', t('round_id_bad'));
    if (!/^[+-]\d\d:\d\d$/.test(offset)) return showBox('round-result', 'bad', t('offset_bad'));
    function at(input) {
      var v = $(input).value;
      return v ? (v.length === 16 ? v + ':00' : v) + offset : null;
    }
    var body = {
      title: $('rf-title').value.trim(),
      opens_at: at('rf-opens'),
      closes_at: at('rf-closes'),
      per_person: Number($('rf-per').value),
      pickup_start: at('rf-pstart'),
      pickup_end: at('rf-pend'),
      mode: $('rf-mode-lottery').checked ? 'lottery' : 'fcfs',
      programme: $('rf-programme').value.trim() || null,
      cooldown_days: Number($('rf-cooldown').value || 0),
      eligibility: eligibilityFromForm(),
    };
    if (body.mode === 'lottery') {
      body.public_randomness_source = $('rf-source').value.trim() || null;
      body.loss_weighting = $('rf-loss').checked;
    }
    var res = await adminRetrying('PUT', '/api/v1/admin/rounds/' + encodeURIComponent(id), body);
    if (res.status === 201 || res.status === 200) {
      showBox('round-result', 'ok', t(res.status === 201 ? 'round_created' : 'round_updated', { id: id }));
      await loadRounds();
      $('rf-id').readOnly = true;
    } else if (res.status === 422) {
      showBox('round-result', 'bad', t('round_invalid'), [errorsList(res)]);
    } else if (res.status !== 401) {
      showBox('round-result', 'bad', t('generic_title'), [problemText(res)]);
    }
  }

  // -- sites ------------------------------------------------------------------------------------

  /** RFC 4180 CSV: quoted fields, doubled quotes, CRLF or LF, an optional UTF-8 BOM. */
  function parseCsv(text) {
    var rows = [];
    var row = [];
    var field = '';
    var quoted = false;
    text = text.replace(/^\uFEFF/, '');
    for (var i = 0; i < text.length; i++) {
      var c = text.charAt(i);
      if (quoted) {
        if (c === '"' && text.charAt(i + 1) === '"') {
          field += '"';
          i++;
        } else if (c === '"') quoted = false;
        else field += c;
      } else if (c === '"') quoted = true;
      else if (c === ',') {
        row.push(field);
        field = '';
      } else if (c === '\n') {
        row.push(field);
        rows.push(row);
        row = [];
        field = '';
      } else if (c !== '\r') field += c;
    }
    if (field !== '' || row.length) {
      row.push(field);
      rows.push(row);
    }
    return rows.filter(function (r) {
      return r.some(function (f) {
        return f.trim() !== '';
      });
    });
  }

  async function uploadSites(ev) {
    ev.preventDefault();
    var rows = parseCsv($('sites-csv').value);
    var need = ['site_id', 'name', 'address', 'district'];
    if (!rows.length) return showBox('sites-result', 'bad', t('sites_empty'));
    var head = rows[0].map(function (h) {
      return h.trim().toLowerCase();
    });
    var missing = need.filter(function (h) {
      return head.indexOf(h) < 0;
    });
    if (missing.length) return showBox('sites-result', 'bad', t('sites_header', { cols: missing.join(', ') }));
    var sites = rows.slice(1).map(function (r) {
      var s = {};
      need.forEach(function (h) {
        s[h] = (r[head.indexOf(h)] || '').trim();
      });
      return s;
    });
    if (!sites.length) return showBox('sites-result', 'bad', t('sites_empty'));
    var res = await adminRetrying('PUT', '/api/v1/admin/sites', { sites: sites });
    if (res.status === 200) {
      sites.forEach(noteSite);
      renderKnownSites();
      showBox('sites-result', 'ok', t('sites_done', { n: fmt(res.data.upserted) }));
    } else if (res.status === 422) {
      showBox('sites-result', 'bad', t('sites_invalid'), [t('sites_invalid_hint'), errorsList(res)]);
    } else if (res.status !== 401) {
      showBox('sites-result', 'bad', t('generic_title'), [problemText(res)]);
    }
  }

  function fileInto(inputId, textareaId) {
    $(inputId).addEventListener('change', function () {
      var file = $(inputId).files && $(inputId).files[0];
      if (!file) return;
      var reader = new FileReader();
      reader.onload = function () {
        $(textareaId).value = String(reader.result || '');
      };
      reader.readAsText(file, 'utf-8');
    });
  }

  // -- wiring -----------------------------------------------------------------------------------

  function init() {
    $('login').addEventListener('submit', function (ev) {
      ev.preventDefault();
      var value = $('token').value.trim();
      if (!value) {
        $('token-error').hidden = false;
        $('token-error').textContent = t('token_empty');
        return;
      }
      $('token-error').hidden = true;
      login(value).then(function () {
        if (!token()) {
          $('token-error').hidden = false;
          $('token-error').textContent = t('token_wrong');
        }
      });
    });
    $('logout').addEventListener('click', function () {
      logout(null);
    });
    $('stats-round').addEventListener('change', function () {
      state.statsRound = $('stats-round').value;
      state.history = [];
      state.fairAt = 0;
      A.clear($('fair-table'));
      $('feed-link').href = '/api/v1/rounds/' + encodeURIComponent(state.statsRound) + '/sites.csv';
      pollStats();
    });
    $('desk-form').addEventListener('submit', collect);
    $('assist-form').addEventListener('submit', assist);
    $('assist-round').addEventListener('change', assistMode);
    // A scanner or ID-card reader types the number and presses Enter: with the phone still
    // empty, Enter moves there instead of sending half a form.
    $('assist-form').addEventListener('keydown', function (ev) {
      if (ev.key !== 'Enter' || ev.target !== $('assist-cid')) return;
      if (!$('assist-phone').value.trim()) {
        ev.preventDefault();
        $('assist-phone').focus();
      }
    });
    $('dt-form').addEventListener('submit', createDeskToken);
    $('batch-form').addEventListener('submit', loadBatch);
    $('draw-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      postDraw(false);
    });
    $('draw-next').addEventListener('click', function () {
      postDraw(true);
    });
    $('batch-id-new').addEventListener('click', function () {
      $('batch-id').value = newBatchId();
    });
    $('batch-add-row').addEventListener('click', function () {
      addBatchRow();
    });
    document.querySelectorAll('input[name="batch_mode"]').forEach(function (radio) {
      radio.addEventListener('change', function () {
        $('batch-csv-box').hidden = batchMode() !== 'csv';
        $('batch-form-box').hidden = batchMode() !== 'form';
        $('batch-carry-box').hidden = batchMode() !== 'carry';
      });
    });
    $('round-form').addEventListener('submit', saveRound);
    $('rf-reset').addEventListener('click', resetRoundForm);
    $('rf-mode-fcfs').addEventListener('change', showRoundMode);
    $('rf-mode-lottery').addEventListener('change', showRoundMode);
    $('sites-form').addEventListener('submit', uploadSites);
    fileInto('batch-file', 'batch-csv');
    fileInto('sites-file', 'sites-csv');
    document.addEventListener('visibilitychange', function () {
      if (!document.hidden) pollStats();
    });

    $('batch-id').value = newBatchId();
    addBatchRow();
    resetRoundForm();
    try {
      $('desk-site').value = sessionStorage.getItem(DESK_SITE_KEY) || '';
    } catch (e) {
      /* nothing remembered */
    }
    var saved = token();
    if (saved) login(saved);
    else logout(null);
  }

  init();
})();
