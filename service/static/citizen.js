/* allot: the citizen page (/). Rounds with a countdown, sites by district with their stock,
 * the reservation form, calm automatic retries while the service is busy, alternatives when a
 * site sells out, and the result card. It uses the public JSON API only.
 */
(function () {
  'use strict';
  var A = window.Allot;
  var t = A.t;
  var el = A.el;
  var $ = A.$;

  var SITES_EVERY_MS = 10000;
  var state = {
    rounds: [],
    round: null,
    sites: [],
    byId: {},
    sitesAt: null,
    job: null,
    sitesTimer: null,
    roundsTimer: null,
    waitingSince: null,
    roundsPending: false,
    lotteryTimer: null,
  };

  function jitter(seconds) {
    return (seconds + Math.random() * Math.max(1, seconds * 0.5)) * 1000;
  }
  function roundStatus(r) {
    var n = A.now();
    if (n < Date.parse(r.opens_at)) return 'upcoming';
    if (n < Date.parse(r.closes_at)) return 'open';
    return 'closed';
  }
  function isLottery(r) {
    return !!r && r.mode === 'lottery';
  }
  function perPerson() {
    return state.round ? state.round.per_person : 1;
  }

  // -- rounds ---------------------------------------------------------------------------------

  async function loadRounds() {
    clearTimeout(state.roundsTimer);
    var res = await A.api('GET', '/api/v1/rounds');
    if (res.status !== 200 || !res.data || !Array.isArray(res.data.rounds)) {
      var secs = res.retryAfter || 5;
      if (!state.rounds.length) {
        A.clear($('round-list')).appendChild(
          el('p', { class: 'notice calm', text: t('rounds_busy', { n: Math.ceil(secs) }) })
        );
      }
      state.roundsTimer = setTimeout(loadRounds, jitter(secs));
      return;
    }
    state.rounds = res.data.rounds.filter(function (r) {
      // a lottery round stays after its close: the draw, the result and the check come then
      if (isLottery(r)) return A.now() < Date.parse(r.pickup_end);
      return roundStatus(r) !== 'closed';
    });
    var keep = state.round
      ? state.rounds.filter(function (r) {
          return r.round_id === state.round.round_id;
        })[0]
      : null;
    var open = state.rounds.filter(function (r) {
      return roundStatus(r) === 'open';
    });
    var previous = state.round ? state.round.round_id : null;
    state.round = keep || open[0] || state.rounds[0] || null;
    renderRounds();
    renderMine();
    var has = !!state.round;
    showChosen();
    $('sites').hidden = !has;
    if (has && state.round.round_id !== previous) {
      state.sites = [];
      loadSites();
    }
    if (!has) state.roundsTimer = setTimeout(loadRounds, 30000);
    updateSubmit();
  }

  /** The form and the lottery card for the chosen round: a lottery round is a registration
   * (its own title, the district choice, the entry and the draw's check), an FCFS round a
   * reservation. Called when the rounds are loaded and when the citizen picks another one. */
  function showChosen() {
    var has = !!state.round;
    var registering = has && (!isLottery(state.round) || roundStatus(state.round) !== 'closed');
    $('reserve').hidden = !has || !registering || !$('result').hidden;
    renderForm();
    renderLottery();
  }

  // -- entitlement: who may take part, said before anyone types an ID ------------------------
  function list(items) {
    return items.join(t('list_sep'));
  }
  function digits(e) {
    return list((e.birth_year_last_digit || []).map(String));
  }
  function regions(e) {
    return list(e.regions || []);
  }
  function eligibilityText(r) {
    var e = r.eligibility;
    if (!e) return null;
    var rules = [];
    if (e.regions) rules.push(t('elig_regions', { regions: regions(e) }));
    if (e.birth_year_last_digit) rules.push(t('elig_digits', { digits: digits(e) }));
    if (e.min_age != null && e.max_age != null) {
      rules.push(t('elig_range', { min: e.min_age, max: e.max_age }));
    } else if (e.min_age != null) {
      rules.push(t('elig_min', { n: e.min_age }));
    } else if (e.max_age != null) {
      rules.push(t('elig_max', { n: e.max_age }));
    }
    return rules.length ? t('elig_intro', { rules: rules.join(t('elig_sep')) }) : null;
  }
  function notEligibleText(r, rule) {
    var e = r.eligibility || {};
    var vars = { regions: regions(e), digits: digits(e), n: rule === 'max_age' ? e.max_age : e.min_age };
    var key = 'not_eligible_' + rule;
    return t(key, vars) === key ? t('generic') : t(key, vars);
  }

  function renderRounds() {
    var box = A.clear($('round-list'));
    if (!state.rounds.length) {
      box.appendChild(
        el('div', { class: 'card empty' }, [
          el('h2', { text: t('no_rounds_title') }),
          el('p', { text: t('no_rounds') }),
        ])
      );
      return;
    }
    state.rounds.forEach(function (r) {
      var status = roundStatus(r);
      var chosen = state.round && r.round_id === state.round.round_id;
      var lines = [
        el('div', { class: 'round-head' }, [
          el('h2', { class: 'round-title', text: r.title }),
          el('span', {
            class: 'badge badge-' + status,
            text: isLottery(r) && status === 'open' ? t('lottery_badge_open') : t('round_' + status),
          }),
        ]),
        el('p', {
          class: 'countdown',
          'data-testid': 'countdown',
          'data-round': r.round_id,
          'aria-live': 'off',
        }),
        el('p', {
          class: 'round-meta',
          text: t('round_per_person', { n: r.per_person }) + ' · ' + (isLottery(r)
            ? t('lottery_window', { range: A.fmtRange(r.opens_at, r.closes_at) })
            : t('round_window', { range: A.fmtRange(r.opens_at, r.closes_at) })),
        }),
        el('p', { class: 'round-meta', text: t('round_pickup', { range: A.fmtRange(r.pickup_start, r.pickup_end) }) }),
      ];
      if (isLottery(r) && r.draw) {
        lines.push(
          el('p', { class: 'round-meta', text: t('lottery_draw_after', { source: r.draw.public_randomness_source }) })
        );
      }
      var who = eligibilityText(r);
      if (who) lines.push(el('p', { class: 'round-meta eligibility', 'data-testid': 'eligibility', text: who }));
      if (r.programme && r.cooldown_days > 0) {
        lines.push(
          el('p', {
            class: 'round-meta',
            'data-testid': 'cooldown',
            text: isLottery(r)
              ? t('lottery_cooldown', { programme: r.programme, days: r.cooldown_days })
              : t('round_cooldown', { programme: r.programme, days: r.cooldown_days }),
          })
        );
      }
      if (state.rounds.length > 1) {
        lines.push(
          el('button', {
            type: 'button',
            class: chosen ? 'primary small' : 'secondary small',
            'aria-pressed': chosen ? 'true' : 'false',
            text: chosen ? t('round_chosen') : t('round_choose'),
            onclick: function () {
              state.round = r;
              state.sites = [];
              renderRounds();
              showChosen();
              loadSites();
              updateSubmit();
            },
          })
        );
      }
      box.appendChild(el('article', { class: 'card round' + (chosen ? ' chosen' : '') }, lines));
    });
    tick();
  }

  /** Once a second: countdowns, and a fresh look at the rounds when one opens or closes. */
  function tick() {
    var refresh = false;
    document.querySelectorAll('.countdown[data-round]').forEach(function (node) {
      var r = state.rounds.filter(function (x) {
        return x.round_id === node.getAttribute('data-round');
      })[0];
      if (!r) return;
      var status = roundStatus(r);
      var text;
      if (status === 'upcoming') {
        text = t('opens_in', { d: A.fmtDuration(Date.parse(r.opens_at) - A.now()) });
      } else if (isLottery(r)) {
        text =
          status === 'open'
            ? t('lottery_closes_in', { d: A.fmtDuration(Date.parse(r.closes_at) - A.now()) })
            : t('draw_status_' + ((r.draw && r.draw.status) || 'registering'));
      } else if (status === 'open') {
        text = r.remaining > 0 ? t('round_left', { n: r.remaining }) : t('round_sold_out');
      } else {
        text = t('round_closed');
      }
      if (node.textContent !== text) node.textContent = text;
      var badge = node.parentNode.querySelector('.badge');
      if (badge && badge.className !== 'badge badge-' + status) refresh = true;
    });
    if (refresh) {
      // A round just opened or closed: show it at once, then ask the server once (not every
      // second while it is busy) for the fresh list.
      renderRounds();
      if (!state.roundsPending) {
        state.roundsPending = true;
        setTimeout(function () {
          loadRounds().then(function () {
            state.roundsPending = false;
          });
        }, Math.random() * 1000);
      }
    }
    updateSubmit();
  }

  // -- sites ------------------------------------------------------------------------------------

  async function loadSites() {
    clearTimeout(state.sitesTimer);
    var r = state.round;
    if (!r) return;
    var res = await A.api('GET', '/api/v1/rounds/' + encodeURIComponent(r.round_id) + '/sites');
    if (!state.round || state.round.round_id !== r.round_id) return;
    var next = document.hidden ? SITES_EVERY_MS * 3 : SITES_EVERY_MS;
    if (res.status === 200 && res.data && Array.isArray(res.data.sites)) {
      state.sites = res.data.sites;
      state.byId = {};
      state.sites.forEach(function (s) {
        state.byId[s.site_id] = s;
      });
      state.sitesAt = new Date();
      var total = 0;
      state.sites.forEach(function (s) {
        total += s.remaining;
      });
      r.remaining = total;
      renderSites();
    } else if (res.status === 404) {
      loadRounds();
      return;
    } else if (res.retryAfter) {
      next = jitter(res.retryAfter);
    }
    state.sitesTimer = setTimeout(loadSites, next);
  }

  function available(s) {
    return isLottery(state.round) || s.remaining >= perPerson();  // entries take no stock
  }
  function stockText(s) {
    if (isLottery(state.round)) return t('lottery_site_units', { n: s.remaining });
    return available(s) ? t('site_left', { n: s.remaining }) : t('site_sold_out');
  }

  /** Rebuilds the list; the select is only rebuilt when its sites changed, so that a picker
   * open on a phone is not closed under the citizen's finger by a stock refresh. */
  function renderSites() {
    var select = $('site_id');
    var current = select.value || select.getAttribute('data-pending') || '';
    select.removeAttribute('data-pending');
    var groups = A.clear($('site-groups'));
    var byDistrict = [];
    var index = {};
    state.sites.forEach(function (s) {
      if (!(s.district in index)) {
        index[s.district] = byDistrict.length;
        byDistrict.push({ district: s.district, sites: [] });
      }
      byDistrict[index[s.district]].sites.push(s);
    });
    var have = [];
    for (var i = 1; i < select.options.length; i++) have.push(select.options[i].value);
    var want = state.sites.map(function (s) {
      return s.site_id;
    });
    var rebuild = have.join('\n') !== want.join('\n');
    if (rebuild) {
      while (select.children.length > 1) select.removeChild(select.lastChild);
    }
    byDistrict.forEach(function (g) {
      var optgroup = rebuild ? el('optgroup', { label: g.district }) : null;
      var list = el('ul', { class: 'site-list' });
      g.sites.forEach(function (s) {
        var ok = available(s);
        var text = s.name + '（' + stockText(s) + '）';
        var disabled = !ok && s.site_id !== current;
        if (rebuild) {
          optgroup.appendChild(el('option', { value: s.site_id, disabled: disabled, text: text }));
        } else {
          var option = select.options[want.indexOf(s.site_id) + 1];
          if (option.textContent !== text) option.textContent = text;
          option.disabled = disabled;
        }
        list.appendChild(
          el('li', { class: 'site' + (ok ? '' : ' sold-out') + (s.site_id === current ? ' chosen' : '') }, [
            el('div', { class: 'site-text' }, [
              el('strong', { text: s.name }),
              el('span', { class: 'addr', text: s.address }),
            ]),
            el('span', {
              class: 'stock' + (ok ? (s.remaining < perPerson() * 20 ? ' low' : '') : ' none'),
              text: stockText(s),
            }),
            ok && !$('reserve').hidden
              ? el('button', {
                  type: 'button',
                  class: s.site_id === current ? 'primary small' : 'secondary small',
                  'aria-label': t('site_pick_named', { name: s.name }),
                  'aria-pressed': s.site_id === current ? 'true' : 'false',
                  text: s.site_id === current ? t('site_picked') : t('site_pick'),
                  onclick: function () {
                    pickSite(s.site_id, true);
                  },
                })
              : null,
          ])
        );
      });
      if (rebuild) select.appendChild(optgroup);
      groups.appendChild(el('h3', { class: 'district', text: g.district }));
      groups.appendChild(list);
    });
    if (current && state.byId[current] && select.value !== current) select.value = current;
    if (!state.sites.length) groups.appendChild(el('p', { class: 'muted', text: t('sites_none') }));
    $('sites-updated').textContent = t('sites_updated', { time: A.fmtClock(state.sitesAt) });
    showSiteHint();
  }

  function pickSite(siteId, moveOn) {
    $('site_id').value = siteId;
    setFieldError('site_id', null);
    renderSites();
    if (moveOn) {
      var next = !$('citizen_id').value ? $('citizen_id') : !$('phone').value ? $('phone') : $('submit');
      $('reserve').scrollIntoView({ block: 'start' });
      next.focus();
    }
  }

  function showSiteHint() {
    var s = state.byId[$('site_id').value];
    $('site_id-hint').textContent = s ? t('site_address', { address: s.address }) : t('site_hint');
  }

  // -- fields -----------------------------------------------------------------------------------

  function setFieldError(id, message) {
    var input = $(id);
    var box = $(id + '-error');
    if (message) {
      box.textContent = message;
      box.hidden = false;
      input.setAttribute('aria-invalid', 'true');
    } else {
      box.textContent = '';
      box.hidden = true;
      input.removeAttribute('aria-invalid');
    }
  }
  function checkField(id) {
    var problem = null;
    if (id === 'citizen_id') problem = A.citizenIdProblem($(id).value);
    else if (id === 'phone') problem = A.phoneProblem($(id).value);
    else if (id === 'site_id') problem = $(id).value ? null : 'site_err_empty';
    setFieldError(id, problem ? t(problem) : null);
    return !problem;
  }
  function checkAll() {
    var first = null;
    ['site_id', 'citizen_id', 'phone'].forEach(function (id) {
      if (!checkField(id) && !first) first = id;
    });
    if (first) $(first).focus();
    return !first;
  }

  // -- sending ----------------------------------------------------------------------------------

  function updateSubmit() {
    var button = $('submit');
    if (state.job) return;
    var r = state.round;
    if (!r) return;
    var status = roundStatus(r);
    var text;
    if (status === 'upcoming') {
      button.disabled = true;
      text = t('submit_opens_in', { d: A.fmtDuration(Date.parse(r.opens_at) - A.now()) });
    } else if (status === 'closed') {
      button.disabled = true;
      text = t('round_closed');
    } else {
      button.disabled = false;
      text = isLottery(r) ? t('lottery_submit') : t('submit');
    }
    if (button.textContent !== text) button.textContent = text;
  }

  /** The form as a reservation, or as a lottery registration (登记) with its extra choice. */
  function renderForm() {
    var lottery = isLottery(state.round);
    $('accept-field').hidden = !lottery;
    var title = lottery ? t('lottery_form_title') : t('form_title');
    if ($('form-title').textContent !== title) $('form-title').textContent = title;
  }

  function waitView(kind, seconds) {
    var box = $('wait');
    var text =
      kind === 'busy'
        ? t('busy_wait', { n: seconds })
        : kind === 'network'
        ? t('network_wait', { n: seconds })
        : t('sending_again');
    if (box.hidden) {
      box.hidden = false;
      state.waitingSince = Date.now();
      if (box.scrollIntoView) box.scrollIntoView({ block: 'center' });
    }
    if ($('wait-text').textContent !== text) $('wait-text').textContent = text;
    $('submit').textContent = t('submit_waiting');
  }
  function hideWait() {
    $('wait').hidden = true;
    state.waitingSince = null;
  }

  function clearOutcome() {
    var box = $('outcome');
    A.clear(box);
    box.hidden = true;
    box.className = 'outcome';
  }
  function showOutcome(kind, title, body, extra) {
    var box = A.clear($('outcome'));
    box.className = 'outcome ' + kind;
    box.setAttribute('role', kind === 'error' ? 'alert' : 'status');
    box.appendChild(el('h3', { text: title }));
    if (body) box.appendChild(el('p', { text: body }));
    (extra || []).forEach(function (node) {
      box.appendChild(node);
    });
    box.hidden = false;
    box.focus();
  }

  async function send(siteId) {
    if (state.job) return;
    clearOutcome();
    var r = state.round;
    var body = {
      citizen_id: A.normaliseCitizenId($('citizen_id').value),
      phone: A.normalisePhone($('phone').value),
      site_id: siteId,
    };
    var kind = isLottery(r) ? 'entries' : 'reservations';
    if (isLottery(r)) body.accept_district = $('accept_district').checked;
    var url = '/api/v1/rounds/' + encodeURIComponent(r.round_id) + '/' + kind;
    var button = $('submit');
    button.disabled = true;
    button.textContent = t('submit_sending');
    var slow = setTimeout(function () {
      if (!state.waitingSince) button.textContent = t('submit_slow');
    }, 5000);
    state.job = A.retrying(function () {
      return A.api('POST', url, body);
    }, waitView);
    var res = await state.job.promise;
    clearTimeout(slow);
    state.job = null;
    hideWait();
    updateSubmit();
    if (res === null) {
      showOutcome('info', t('stopped_title'), t('stopped'));
      return;
    }
    handleAnswer(res, body, r);
  }

  function handleAnswer(res, body, r) {
    var code = res.data && res.data.code;
    if ((res.status === 200 || res.status === 201) && res.data && res.data.entry_id) {
      rememberEntry(res.data);
      showOutcome('info', t('entry_title'), t('entry_saved'));
      renderLottery();
      return;
    }
    if (res.status === 200 || res.status === 201) {
      showResult(res.data);
      return;
    }
    if (res.status === 409 && code === 'already-entered') {
      showOutcome('warn', t('already_entered_title'), t('already_entered'));
      return;
    }
    if (res.status === 409 && code === 'wrong-mode') {
      loadRounds();
    }
    if (res.status === 409 && code === 'sold-out') {
      showAlternatives((res.data && res.data.alternatives) || [], body.site_id);
      loadSites();
      return;
    }
    if (res.status === 409 && code === 'already-reserved') {
      var links = A.mine()
        .filter(function (m) {
          return m.round_id === r.round_id;
        })
        .map(function (m) {
          return el('p', {}, [
            el('a', { href: '/r/' + encodeURIComponent(m.id), text: t('mine_item', { code: m.code, site: m.site }) }),
          ]);
        });
      showOutcome('warn', t('already_title'), t('already'), links);
      return;
    }
    if (res.status === 409 && code === 'not-eligible') {
      showOutcome('warn', t('not_eligible_title'), notEligibleText(r, res.data.rule));
      return;
    }
    if (res.status === 409 && code === 'in-cooldown') {
      // until is in the round's own offset, like every time on this page (the operator's clock)
      var until = { time: A.fmtTime(res.data.until) };
      showOutcome('warn', t('cooldown_title'), isLottery(r) ? t('cooldown_lottery', until) : t('cooldown', until));
      return;
    }
    if (res.status === 409 && code === 'round-not-open') {
      var opensAt = res.data && res.data.opens_at;
      var early = opensAt && Date.parse(opensAt) > A.now();
      showOutcome(
        'warn',
        early ? t('not_open_title') : t('closed_title'),
        early ? t('not_open', { time: A.fmtTime(r.opens_at) }) : t('closed')
      );
      loadRounds();
      return;
    }
    if (res.status === 404) {
      showOutcome('warn', t('gone_title'), t('gone'));
      loadRounds();
      loadSites();
      return;
    }
    if (res.status === 422 && res.data && Array.isArray(res.data.errors)) {
      var first = null;
      res.data.errors.forEach(function (e) {
        var id = e.field === 'citizen_id' ? 'citizen_id' : e.field === 'phone' ? 'phone' : e.field === 'site_id' ? 'site_id' : null;
        if (!id) return;
        setFieldError(id, t(id === 'citizen_id' ? 'cid_err_server' : id === 'phone' ? 'phone_err_format' : 'site_err_empty'));
        if (!first) first = id;
      });
      if (first) {
        $(first).focus();
        return;
      }
    }
    showOutcome('error', t('generic_title'), t('generic'));
  }

  function showAlternatives(alternatives, soldSite) {
    var s = state.byId[soldSite];
    var extra = [];
    if (alternatives.length) {
      var list = el('ul', { class: 'alternatives' });
      alternatives.forEach(function (a) {
        list.appendChild(
          el('li', {}, [
            el(
              'button',
              {
                type: 'button',
                class: 'alt',
                'data-testid': 'alternative',
                'data-site-id': a.site_id,
                onclick: function () {
                  if (!state.byId[a.site_id]) {
                    state.byId[a.site_id] = a;
                    $('site_id').appendChild(el('option', { value: a.site_id, text: a.name }));
                  }
                  $('site_id').value = a.site_id;
                  showSiteHint();
                  send(a.site_id);
                },
              },
              [
                el('strong', { text: a.name }),
                el('span', { class: 'alt-meta', text: a.district + ' · ' + t('site_left', { n: a.remaining }) }),
                el('span', { class: 'alt-go', text: t('alt_go') }),
              ]
            ),
          ])
        );
      });
      extra.push(list);
    }
    showOutcome(
      'warn',
      t('sold_out_title', { site: s ? s.name : soldSite }),
      alternatives.length ? t('sold_out_alts') : t('sold_out_none'),
      extra
    );
  }

  function showResult(r) {
    var site = state.byId[r.site_id] || null;
    A.remember(r, site ? site.name : null);
    clearOutcome();
    $('reserve').hidden = true;
    var box = $('result');
    box.hidden = false;
    var heading = A.renderReservation(box, r, site, { link: true });
    box.appendChild(
      el('div', { class: 'actions' }, [
        el('button', {
          type: 'button',
          class: 'secondary',
          text: t('again'),
          onclick: function () {
            box.hidden = true;
            A.clear(box);
            $('citizen_id').value = '';
            $('reserve').hidden = false;
            renderMine();
            renderSites();
            $('citizen_id').focus();
          },
        }),
      ])
    );
    renderMine();
    renderSites();
    box.scrollIntoView({ block: 'start' });
    heading.focus();
    loadSites();
  }

  function renderMine() {
    var ids = {};
    state.rounds.forEach(function (r) {
      ids[r.round_id] = true;
    });
    var items = A.mine().filter(function (m) {
      return ids[m.round_id];
    });
    var box = A.clear($('mine'));
    box.hidden = !items.length || !$('result').hidden;
    if (!items.length) return;
    box.appendChild(el('h2', { class: 'small-title', text: t('mine_title') }));
    var list = el('ul', { class: 'plain' });
    items.forEach(function (m) {
      list.appendChild(
        el('li', {}, [el('a', { href: '/r/' + encodeURIComponent(m.id), text: t('mine_item', { code: m.code, site: m.site }) })])
      );
    });
    box.appendChild(list);
  }

  // -- lottery: the citizen's entries, the result, and checking the draw -----------------------

  var ENTRIES_KEY = 'allot.entries';
  function entries() {
    try {
      var list = JSON.parse(localStorage.getItem(ENTRIES_KEY) || '[]');
      return Array.isArray(list) ? list : [];
    } catch (e) {
      return [];
    }
  }
  function rememberEntry(entry) {
    var list = entries().filter(function (x) {
      return x.id !== entry.entry_id && x.round_id !== entry.round_id;
    });
    list.unshift({ id: entry.entry_id, round_id: entry.round_id });
    try {
      localStorage.setItem(ENTRIES_KEY, JSON.stringify(list.slice(0, 10)));
    } catch (e) {
      /* private mode: the entry is on screen this once */
    }
  }

  function statusText(status) {
    return t('entry_status_' + status.replace('-', '_'));
  }

  /** The lottery card: my entry's status and receipt, my pickup code once won, and the draw's
   * commitment, secret, seed and files for anyone who wants to check it. */
  async function renderLottery() {
    clearTimeout(state.lotteryTimer);
    var r = state.round;
    var box = $('lottery');
    if (!isLottery(r)) {
      box.hidden = true;
      return;
    }
    var nodes = [];
    var mineHere = entries().filter(function (x) {
      return x.round_id === r.round_id;
    })[0];
    if (mineHere) {
      var res = await A.api('GET', '/api/v1/entries/' + encodeURIComponent(mineHere.id));
      if (res.status === 200 && res.data) {
        var e = res.data;
        var site = state.byId[e.site_id];
        nodes.push(el('h2', { text: t('entry_title') }));
        nodes.push(el('p', { class: 'status-badge entry-' + e.status, 'data-testid': 'entry-status', text: statusText(e.status) }));
        nodes.push(el('p', { text: t('entry_site', { site: site ? site.name : e.site_id }) }));
        nodes.push(el('p', { class: 'receipt', 'data-testid': 'entry-receipt', text: t('entry_receipt', { receipt: e.receipt }) }));
        if (e.status === 'registered' && roundStatus(r) === 'open') {
          nodes.push(el('p', { class: 'hint', text: t('entry_change') }));
          nodes.push(
            el('button', {
              type: 'button',
              class: 'secondary small',
              text: t('entry_withdraw'),
              onclick: async function () {
                await A.api('DELETE', '/api/v1/entries/' + encodeURIComponent(e.entry_id));
                renderLottery();
              },
            })
          );
        }
        if (e.status === 'won' && e.reservation_id) {
          var won = await A.api('GET', '/api/v1/reservations/' + encodeURIComponent(e.reservation_id));
          if (won.status === 200 && won.data) {
            A.remember(won.data, site ? site.name : null);
            nodes.push(el('p', { class: 'code', 'data-testid': 'entry-pickup-code', text: t('entry_won_code', { code: won.data.pickup_code }) }));
            nodes.push(el('p', {}, [el('a', { href: '/r/' + encodeURIComponent(e.reservation_id), text: t('entry_won_link') })]));
          }
        }
      }
    }
    if (roundStatus(r) !== 'upcoming') {
      var d = await A.api('GET', '/api/v1/rounds/' + encodeURIComponent(r.round_id) + '/draw');
      if (d.status === 200 && d.data) {
        var rec = d.data;
        var root = '/api/v1/rounds/' + encodeURIComponent(r.round_id) + '/draw';
        var pending = t('check_pending');
        var check = el('details', { class: 'check', 'data-testid': 'check-draw', open: rec.status !== 'registering' }, [
          el('summary', { text: t('check_title') + ' · ' + t('draw_status_' + rec.status) }),
          el('p', { class: 'hint', text: t('check_intro') }),
          el('p', { class: 'mono', text: t('check_commitment', { v: rec.commitment }) }),
          el('p', { class: 'mono', text: t('check_secret', { v: rec.secret || pending }) }),
          el('p', { class: 'mono', text: t('check_randomness', { v: rec.public_randomness || pending }) }),
          el('p', { class: 'mono', text: t('check_seed', { v: rec.seed || pending }) }),
        ]);
        var files = ['entries.csv', 'stock.csv'];
        if (rec.results_digest) files.push('results.csv');
        (rec.passes || []).forEach(function (p) {
          files.push('pass-' + p.pass + '.csv');
        });
        if (rec.status !== 'registering') {
          check.appendChild(
            el('p', {}, [t('check_files')].concat(
              files.map(function (f) {
                return el('a', { href: root + '/' + f, class: 'file', text: f });
              })
            ))
          );
        }
        nodes.push(check);
      }
    }
    A.clear(box);
    nodes.forEach(function (n) {
      box.appendChild(n);
    });
    box.hidden = !nodes.length;
    state.lotteryTimer = setTimeout(renderLottery, roundStatus(r) === 'open' ? 30000 : 5000);
  }

  // -- wiring ------------------------------------------------------------------------------------

  function init() {
    A.keepAcrossLanguageSwitch(['site_id', 'citizen_id', 'phone']);
    $('reserve').addEventListener('submit', function (ev) {
      ev.preventDefault();
      if (state.job || !state.round) return;
      clearOutcome();
      if (!checkAll()) return;
      send($('site_id').value);
    });
    $('wait-stop').addEventListener('click', function () {
      if (state.job) state.job.stop();
    });
    // A message shown on blur moves the button down; if the blur came from pressing that very
    // button, the press would miss it. The submit handler checks every field anyway.
    var pressingSubmit = false;
    ['pointerdown', 'mousedown', 'touchstart'].forEach(function (type) {
      $('submit').addEventListener(type, function () {
        pressingSubmit = true;
        setTimeout(function () {
          pressingSubmit = false;
        }, 1500);
      }, { passive: true });
    });
    ['citizen_id', 'phone'].forEach(function (id) {
      $(id).addEventListener('blur', function () {
        if ($(id).value && !pressingSubmit) checkField(id);
      });
      $(id).addEventListener('input', function () {
        if ($(id).getAttribute('aria-invalid')) checkField(id);
      });
    });
    $('site_id').addEventListener('change', function () {
      checkField('site_id');
      renderSites();
    });
    document.addEventListener('visibilitychange', function () {
      if (!document.hidden && state.round) loadSites();
    });
    var feed = $('open-data');
    setInterval(tick, 1000);
    loadRounds().then(function () {
      if (state.round && feed) {
        feed.href = '/api/v1/rounds/' + encodeURIComponent(state.round.round_id) + '/sites.csv';
        feed.textContent = t('footer_open_data');
      }
    });
  }

  init();
})();
