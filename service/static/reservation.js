/* allot: a reservation's own page (/r/{reservation_id}): look it up again, or cancel it. */
(function () {
  'use strict';
  var A = window.Allot;
  var t = A.t;
  var el = A.el;
  var $ = A.$;

  var id = decodeURIComponent(location.pathname.replace(/^\/r\//, '').replace(/\/$/, ''));
  var base = '/api/v1/reservations/' + encodeURIComponent(id);

  function waitView(kind, seconds) {
    $('wait').hidden = false;
    var text =
      kind === 'busy'
        ? t('busy_wait', { n: seconds })
        : kind === 'network'
        ? t('network_wait', { n: seconds })
        : t('loading');
    if ($('wait-text').textContent !== text) $('wait-text').textContent = text;
  }
  function ask(method, url) {
    return A.retrying(function () {
      return A.api(method, url);
    }, waitView).promise.then(function (res) {
      $('wait').hidden = true;
      return res;
    });
  }
  function showOutcome(kind, title, body) {
    var box = A.clear($('outcome'));
    box.className = 'outcome ' + kind;
    box.setAttribute('role', kind === 'error' ? 'alert' : 'status');
    box.appendChild(el('h2', { text: title }));
    if (body) box.appendChild(el('p', { text: body }));
    box.hidden = false;
    box.focus();
  }

  async function siteOf(r) {
    var res = await A.api('GET', '/api/v1/rounds/' + encodeURIComponent(r.round_id) + '/sites');
    if (res.status !== 200 || !res.data) return null;
    return (
      res.data.sites.filter(function (s) {
        return s.site_id === r.site_id;
      })[0] || null
    );
  }

  async function show(r, site) {
    var box = $('result');
    box.hidden = false;
    A.renderReservation(box, r, site, { heading: t('res_heading') });
    $('cancel-box').hidden = r.status !== 'confirmed';
    document.title = t('res_page_title') + ' · ' + r.pickup_code;
  }

  async function load() {
    var res = await ask('GET', base);
    $('loading').hidden = true;
    if (res.status === 404) {
      showOutcome('warn', t('res_missing_title'), t('res_missing'));
      return;
    }
    if (res.status !== 200 || !res.data) {
      showOutcome('error', t('generic_title'), t('generic'));
      return;
    }
    var site = await siteOf(res.data);
    await show(res.data, site);
    wireCancel(res.data, site);
  }

  function wireCancel(r, site) {
    $('cancel').addEventListener('click', function () {
      $('cancel').hidden = true;
      $('cancel-confirm').hidden = false;
      $('cancel-no').focus();
    });
    $('cancel-no').addEventListener('click', function () {
      $('cancel-confirm').hidden = true;
      $('cancel').hidden = false;
      $('cancel').focus();
    });
    $('cancel-yes').addEventListener('click', async function () {
      $('cancel-yes').disabled = true;
      var res = await ask('DELETE', base);
      $('cancel-yes').disabled = false;
      $('cancel-confirm').hidden = true;
      $('cancel').hidden = false;
      if (res.status === 200 && res.data) {
        A.forget(r.reservation_id);
        await show(res.data, site);
        showOutcome('info', t('cancelled_title'), t('cancelled'));
        return;
      }
      if (res.status === 409) {
        var fresh = await A.api('GET', base);
        if (fresh.status === 200 && fresh.data) await show(fresh.data, site);
        showOutcome('warn', t('cannot_cancel_title'), t('cannot_cancel'));
        return;
      }
      showOutcome('error', t('generic_title'), t('generic'));
    });
  }

  load();
})();
