/* allot: helpers shared by the citizen page, the reservation page and the operator console.
 * Plain ES2017 for old phones: no build step, no dependencies, nothing loaded from elsewhere.
 * Everything is exported on window.Allot.
 */
(function () {
  'use strict';

  var dict = {};
  try {
    dict = JSON.parse(document.getElementById('i18n').textContent);
  } catch (e) {
    dict = {};
  }
  var lang = document.documentElement.lang || 'zh-Hans';

  /** The text for `key` in the page's language, with {name} placeholders filled from vars. */
  function t(key, vars) {
    var s = Object.prototype.hasOwnProperty.call(dict, key) ? dict[key] : key;
    if (vars) {
      s = s.replace(/\{(\w+)\}/g, function (m, k) {
        return Object.prototype.hasOwnProperty.call(vars, k) ? String(vars[k]) : m;
      });
    }
    return s;
  }

  // -- the clock --------------------------------------------------------------------------
  // A phone's clock may be wrong by minutes; countdowns use the server's Date header instead
  // when the two differ by more than the header's one-second resolution can explain.
  var skew = 0;
  function noteServerDate(res) {
    var d = res && res.headers && res.headers.get('Date');
    if (!d) return;
    var ms = Date.parse(d);
    if (isNaN(ms)) return;
    var est = ms + 500 - Date.now();
    skew = Math.abs(est) > 1500 ? est : 0;
  }
  function now() {
    return Date.now() + skew;
  }
  function sleep(ms) {
    return new Promise(function (resolve) {
      setTimeout(resolve, Math.max(0, ms));
    });
  }

  // -- DOM ----------------------------------------------------------------------------------
  /** el('p', {class: 'x', text: 'hi', onclick: f}, [children]): text is always text, never HTML. */
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === 'text') node.textContent = v;
        else if (k === 'class') node.className = v;
        else if (k.slice(0, 2) === 'on') node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? '' : String(v));
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      node.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    });
    return node;
  }
  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }
  function $(id) {
    return document.getElementById(id);
  }

  // -- the API ------------------------------------------------------------------------------
  var TIMEOUT_MS = 15000;

  function retryAfterSeconds(value) {
    if (!value) return null;
    var secs;
    if (/^\s*\d+\s*$/.test(value)) secs = parseInt(value, 10);
    else {
      var at = Date.parse(value);
      if (isNaN(at)) return null;
      secs = Math.ceil((at - now()) / 1000);
    }
    return Math.min(300, Math.max(1, secs));
  }

  /**
   * One request. Never throws: a network failure or a timeout answers {status: 0}.
   * body: an object (sent as JSON) or a string (sent as opts.contentType, default text/csv).
   */
  async function api(method, url, body, opts) {
    opts = opts || {};
    // The pages are the `web` channel (the fairness report's, and allot_asks_total's).
    var headers = { Accept: 'application/json', 'X-Allot-Channel': 'web' };
    if (opts.token) headers.Authorization = 'Bearer ' + opts.token;
    var payload;
    if (body !== undefined && body !== null) {
      if (typeof body === 'string') {
        payload = body;
        headers['Content-Type'] = opts.contentType || 'text/csv; charset=utf-8';
      } else {
        payload = JSON.stringify(body);
        headers['Content-Type'] = 'application/json';
      }
    }
    var ctrl = typeof AbortController === 'function' ? new AbortController() : null;
    var timer = setTimeout(function () {
      if (ctrl) ctrl.abort();
    }, opts.timeout || TIMEOUT_MS);
    try {
      var res = await fetch(url, {
        method: method,
        headers: headers,
        body: payload,
        signal: ctrl ? ctrl.signal : undefined,
        credentials: 'same-origin',
        cache: 'no-store',
      });
      noteServerDate(res);
      var text = await res.text();
      var data = null;
      if (text && /json/.test(res.headers.get('Content-Type') || '')) {
        try {
          data = JSON.parse(text);
        } catch (e) {
          data = null;
        }
      }
      return {
        status: res.status,
        data: data,
        text: text,
        retryAfter: retryAfterSeconds(res.headers.get('Retry-After')),
      };
    } catch (e) {
      return { status: 0, data: null, text: '', retryAfter: null };
    } finally {
      clearTimeout(timer);
    }
  }

  /** 429 and 503 (and a proxy's 502/504, and no answer at all) mean: wait, then ask again. */
  function isBusy(status) {
    return status === 0 || status === 429 || status >= 500;
  }

  /**
   * Sends with send() until the answer is not "busy". While busy it waits Retry-After plus a
   * random part of it (so a crowd does not come back in the same millisecond), and calls
   * view(kind, secondsLeft) every quarter second: kind is 'busy', 'network' or 'sending'.
   * Returns {promise, stop}; after stop() the promise resolves to null.
   */
  function retrying(send, view) {
    var stopped = false;
    var attempt = 0;
    var promise = (async function () {
      for (;;) {
        var res = await send();
        if (stopped) return null;
        if (!isBusy(res.status)) return res;
        attempt += 1;
        var base = res.retryAfter;
        if (base === null) base = Math.min(30, Math.pow(2, Math.min(attempt, 5)));
        var waitMs = (base + Math.random() * Math.max(1, base * 0.5)) * 1000;
        var until = Date.now() + waitMs;
        var kind = res.status === 0 ? 'network' : 'busy';
        while (Date.now() < until) {
          if (stopped) return null;
          view(kind, Math.ceil((until - Date.now()) / 1000));
          await sleep(Math.min(250, until - Date.now()));
        }
        if (stopped) return null;
        view('sending', 0);
      }
    })();
    return {
      promise: promise,
      stop: function () {
        stopped = true;
      },
    };
  }

  // -- citizen ID and phone, checked as the server checks them --------------------------------
  var WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
  var CHECK_CHARS = '10X98765432';

  /** The server's canonical form first (NFKC: fullwidth and other compatibility digits become
   * the ASCII digits they show), so the page accepts exactly what the server accepts. */
  function nfkc(raw) {
    var s = String(raw || '');
    return s.normalize ? s.normalize('NFKC') : s;
  }
  function normaliseCitizenId(raw) {
    return nfkc(raw)
      .replace(/\s+/g, '')
      .toUpperCase();
  }
  /** null when the ID is valid, else the key of a plain-language message. */
  function citizenIdProblem(raw) {
    var v = normaliseCitizenId(raw);
    if (!v) return 'cid_err_empty';
    if (!/^[0-9X]*$/.test(v) || v.slice(0, 17).indexOf('X') >= 0) return 'cid_err_chars';
    if (v.length !== 18) return 'cid_err_length';
    var y = parseInt(v.slice(6, 10), 10);
    var m = parseInt(v.slice(10, 12), 10);
    var d = parseInt(v.slice(12, 14), 10);
    var born = new Date(Date.UTC(y, m - 1, d));
    if (
      y < 1800 ||
      born.getUTCFullYear() !== y ||
      born.getUTCMonth() !== m - 1 ||
      born.getUTCDate() !== d ||
      born.getTime() > Date.now()
    ) {
      return 'cid_err_birth';
    }
    var sum = 0;
    for (var i = 0; i < 17; i++) sum += parseInt(v.charAt(i), 10) * WEIGHTS[i];
    if (CHECK_CHARS.charAt(sum % 11) !== v.charAt(17)) return 'cid_err_check';
    return null;
  }
  function normalisePhone(raw) {
    return nfkc(raw).replace(/[\s-]+/g, '');
  }
  function phoneProblem(raw) {
    var v = normalisePhone(raw);
    if (!v) return 'phone_err_empty';
    if (!/^1[3-9]\d{9}$/.test(v)) return 'phone_err_format';
    return null;
  }

  // -- times, shown as the wall clock the operator wrote (the round's own offset) ------------
  function wallClock(iso) {
    var m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/.exec(iso || '');
    if (!m) return null;
    return { y: +m[1], mo: +m[2], d: +m[3], hh: m[4], mm: m[5] };
  }
  function fmtTime(iso) {
    var w = wallClock(iso);
    if (!w) return iso || '';
    var vars = { y: w.y, m: w.mo, d: w.d, hh: w.hh, mm: w.mm, mon: t('month_' + w.mo) };
    return t(w.y === new Date(now()).getFullYear() ? 'fmt_datetime' : 'fmt_datetime_year', vars);
  }
  function fmtRange(a, b) {
    return t('fmt_range', { from: fmtTime(a), to: fmtTime(b) });
  }
  function fmtDuration(ms) {
    var secs = Math.max(0, Math.ceil(ms / 1000));
    var d = Math.floor(secs / 86400);
    var h = Math.floor((secs % 86400) / 3600);
    var m = Math.floor((secs % 3600) / 60);
    var s = secs % 60;
    function two(n) {
      return n < 10 ? '0' + n : String(n);
    }
    if (d > 0) return t('dur_dh', { d: d, h: h });
    if (h > 0) return t('dur_hms', { h: h, m: two(m), s: two(s) });
    if (m > 0) return t('dur_ms', { m: m, s: two(s) });
    return t('dur_s', { s: s });
  }
  function fmtClock(date) {
    function two(n) {
      return n < 10 ? '0' + n : String(n);
    }
    return two(date.getHours()) + ':' + two(date.getMinutes()) + ':' + two(date.getSeconds());
  }

  // -- the citizen's own reservations, remembered on this device ----------------------------
  var MINE_KEY = 'allot.mine';
  function mine() {
    try {
      var list = JSON.parse(localStorage.getItem(MINE_KEY) || '[]');
      return Array.isArray(list) ? list : [];
    } catch (e) {
      return [];
    }
  }
  function remember(r, siteName) {
    var list = mine().filter(function (x) {
      return x.id !== r.reservation_id;
    });
    list.unshift({
      id: r.reservation_id,
      round_id: r.round_id,
      code: r.pickup_code,
      site: siteName || r.site_id,
      masked: r.citizen_id_masked,
    });
    try {
      localStorage.setItem(MINE_KEY, JSON.stringify(list.slice(0, 10)));
    } catch (e) {
      /* private mode: the citizen still has the link and the code on screen */
    }
  }
  function forget(id) {
    try {
      localStorage.setItem(
        MINE_KEY,
        JSON.stringify(
          mine().filter(function (x) {
            return x.id !== id;
          })
        )
      );
    } catch (e) {
      /* nothing to do */
    }
  }

  // -- the reservation card (citizen page and /r/{id}) ---------------------------------------
  function reservationLink(r) {
    return '/r/' + encodeURIComponent(r.reservation_id);
  }
  /** Fills `box` with a reservation: code, QR, site, pickup window, status. */
  function renderReservation(box, r, site, opts) {
    opts = opts || {};
    clear(box);
    var live = r.status === 'confirmed';
    var heading = el('h2', { id: 'result-title', tabindex: '-1', text: opts.heading || t('result_title') });
    box.appendChild(heading);
    box.appendChild(
      el('p', { class: 'status-badge status-' + r.status, 'data-testid': 'reservation-status' }, [
        t('status_' + r.status),
      ])
    );
    var codeBlock = el('div', { class: 'code-block' + (live ? '' : ' inactive') }, [
      el('p', { class: 'code-label', id: 'code-label', text: t('code_label') }),
      el('p', {
        class: 'pickup-code',
        'data-testid': 'pickup-code',
        'aria-describedby': 'code-label',
        text: r.pickup_code,
      }),
      el('img', {
        class: 'qr',
        src: '/api/v1/reservations/' + encodeURIComponent(r.reservation_id) + '/qr.svg',
        alt: t('qr_alt', { code: r.pickup_code }),
        width: 176,
        height: 176,
      }),
    ]);
    box.appendChild(codeBlock);
    if (live) box.appendChild(el('p', { class: 'hint center', text: t('code_hint') }));
    var rows = [
      [t('site_label_short'), site ? site.name : r.site_id],
      [t('address_label'), site ? site.address : ''],
      [t('pickup_label'), fmtRange(r.pickup_start, r.pickup_end)],
      [t('quantity_label'), t('units', { n: r.quantity })],
      [t('cid_label_short'), r.citizen_id_masked],
    ];
    var dl = el('dl', { class: 'facts' });
    rows.forEach(function (row) {
      if (!row[1]) return;
      dl.appendChild(el('dt', { text: row[0] }));
      dl.appendChild(el('dd', { text: row[1] }));
    });
    box.appendChild(dl);
    if (opts.link) {
      box.appendChild(
        el('p', { class: 'link-line' }, [
          el('a', { href: reservationLink(r), 'data-testid': 'reservation-link', text: t('result_link') }),
        ])
      );
      box.appendChild(el('p', { class: 'hint', text: t('result_link_hint') }));
    }
    return heading;
  }

  // -- keep what was typed when the language is switched (the switch reloads the page) -------
  function keepAcrossLanguageSwitch(ids) {
    var KEY = 'allot.form';
    try {
      var saved = JSON.parse(sessionStorage.getItem(KEY) || 'null');
      sessionStorage.removeItem(KEY);
      if (saved) {
        ids.forEach(function (id) {
          var node = $(id);
          if (!saved[id] || !node) return;
          if (node.tagName === 'SELECT') node.setAttribute('data-pending', saved[id]);
          else node.value = saved[id];
        });
      }
    } catch (e) {
      /* nothing saved */
    }
    document.querySelectorAll('.langs a').forEach(function (a) {
      a.addEventListener('click', function () {
        var values = {};
        ids.forEach(function (id) {
          if ($(id)) values[id] = $(id).value;
        });
        try {
          sessionStorage.setItem(KEY, JSON.stringify(values));
        } catch (e) {
          /* the form is simply empty after the switch */
        }
      });
    });
  }
  /** For a select whose options arrive later: a value restored before they did. */
  function pendingValue(id) {
    var node = $(id);
    return node ? node.getAttribute('data-pending') : null;
  }

  window.Allot = {
    t: t,
    lang: lang,
    now: now,
    sleep: sleep,
    el: el,
    clear: clear,
    $: $,
    api: api,
    isBusy: isBusy,
    retrying: retrying,
    normaliseCitizenId: normaliseCitizenId,
    citizenIdProblem: citizenIdProblem,
    normalisePhone: normalisePhone,
    phoneProblem: phoneProblem,
    fmtTime: fmtTime,
    fmtRange: fmtRange,
    fmtDuration: fmtDuration,
    fmtClock: fmtClock,
    mine: mine,
    remember: remember,
    forget: forget,
    reservationLink: reservationLink,
    renderReservation: renderReservation,
    keepAcrossLanguageSwitch: keepAcrossLanguageSwitch,
    pendingValue: pendingValue,
  };
})();
