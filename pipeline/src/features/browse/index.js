(function () {
  // The state lives in the URL: #q=TEXT&max-density=PERCENT&sort=freq|max&dir=asc|desc.
  var input = document.getElementById('search'), count = document.getElementById('count');
  var density = document.getElementById('max-density');
  var body = document.querySelector('#features tbody');
  var rows = Array.prototype.slice.call(body.querySelectorAll('tr.feature-row'));
  var sort = { key: '', dir: 'desc' };
  rows.forEach(function (r) { r.searchText = (r.getAttribute('data-tokens') || '').toLowerCase(); });
  function decode(v) { try { return decodeURIComponent(v); } catch (e) { return v; } }
  function readHash() {
    var state = {};
    location.hash.replace(/^#/, '').split('&').forEach(function (part) {
      var at = part.indexOf('=');
      if (at > 0) state[part.slice(0, at)] = decode(part.slice(at + 1));
    });
    return state;
  }
  function writeHash() {
    var parts = [];
    if (input.value) parts.push('q=' + encodeURIComponent(input.value));
    if (density.value) parts.push('max-density=' + encodeURIComponent(density.value));
    if (sort.key) parts.push('sort=' + sort.key, 'dir=' + sort.dir);
    try { history.replaceState(null, '', parts.length ? '#' + parts.join('&') : location.href.split('#')[0]); } catch (e) {}
  }
  function filter() {
    var q = input.value.trim(), lq = q.toLowerCase();
    var id = /^#?\d+$/.test(q) ? Number(q.replace('#', '')) : -1, shown = 0;
    // The limit is a percentage of tokens; rows carry their density as a share.
    var limit = density.value === '' ? Infinity : Number(density.value) / 100;
    rows.forEach(function (r) {
      var hit = !q || Number(r.getAttribute('data-id')) === id || r.searchText.indexOf(lq) >= 0;
      hit = hit && !(Number(r.getAttribute('data-freq')) > limit);
      r.hidden = !hit;
      if (hit) shown++;
    });
    count.textContent = shown + ' of ' + rows.length + ' features';
  }
  function sortBy(key, dir) {
    var attr = 'data-' + key, sign = dir === 'asc' ? 1 : -1;
    sort = { key: key, dir: dir };
    document.querySelectorAll('#features th[data-sort]').forEach(function (th) {
      if (th.getAttribute('data-sort') === key) th.setAttribute('data-dir', dir); else th.removeAttribute('data-dir');
    });
    rows.sort(function (a, b) {
      return (Number(a.getAttribute(attr)) - Number(b.getAttribute(attr))) * sign
        || Number(a.getAttribute('data-id')) - Number(b.getAttribute('data-id'));
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (r) { frag.appendChild(r); });
    body.appendChild(frag);
  }
  var state = readHash();
  if (state.q) input.value = state.q;
  if (state['max-density'] && !isNaN(Number(state['max-density']))) density.value = state['max-density'];
  if (state.sort === 'freq' || state.sort === 'max') sortBy(state.sort, state.dir === 'asc' ? 'asc' : 'desc');
  [input, density].forEach(function (el) {
    el.addEventListener('input', function () { filter(); writeHash(); });
  });
  document.querySelectorAll('#features th[data-sort]').forEach(function (th) {
    th.addEventListener('click', function () {
      sortBy(th.getAttribute('data-sort'), th.getAttribute('data-dir') === 'desc' ? 'asc' : 'desc');
      writeHash();
    });
  });
  filter();
})();
