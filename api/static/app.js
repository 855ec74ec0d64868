// lipfarm jobs page: lists the farm's jobs from the JSON API under /v1, plays finished outputs,
// watches renders live over HLS. Plain ES2020, no framework, no build step.
'use strict';

(() => {
  const TOKEN_KEY = 'lipfarm.token';
  const PAGE_SIZE = 20;
  const MAX_PAGES_PER_REFRESH = 25;
  const FAST_MS = 2000;       // while any listed job is unfinished
  const SLOW_MS = 15000;      // when every listed job has ended
  const HIDDEN_MS = 30000;    // while the tab is in the background
  const MAX_BACKOFF_MS = 30000;
  const ACTIVE = new Set(['queued', 'planning', 'rendering', 'finalizing']);
  const CHUNK_ORDER = ['committed', 'running', 'queued', 'failed', 'cancelled'];
  const STATE_LABEL = {
    queued: 'Queued', planning: 'Planning', rendering: 'Rendering', finalizing: 'Finalizing',
    done: 'Done', failed: 'Failed', cancelled: 'Cancelled',
  };

  const $ = (sel, root = document) => root.querySelector(sel);
  const ui = {
    auth: $('[data-role="auth"]'),
    authForm: $('[data-role="auth-form"]'),
    authError: $('[data-role="auth-error"]'),
    tokenInput: $('[data-role="token-input"]'),
    connect: $('[data-role="connect"]'),
    jobsView: $('[data-role="jobs-view"]'),
    table: $('[data-role="job-table"]'),
    empty: $('[data-role="empty"]'),
    banner: $('[data-role="banner"]'),
    more: $('[data-role="more"]'),
    filter: $('[data-role="state-filter"]'),
    refresh: $('[data-role="refresh"]'),
    changeToken: $('[data-role="change-token"]'),
    connection: $('[data-role="connection"]'),
    template: $('#job-template'),
  };

  const metaApi = document.querySelector('meta[name="lipfarm-api"]');
  const apiBase = new URL(((metaApi && metaApi.content) || 'v1').replace(/\/*$/, '/'), document.baseURI);

  const state = {
    token: '',
    filter: '',
    rows: new Map(),          // job id -> row (see createRow)
    nextCursor: null,
    wanted: PAGE_SIZE,        // how many jobs the list should hold (grows with "Load more")
    generation: 0,            // bumped whenever the list is reset; stale responses are dropped
    controller: new AbortController(),
    timer: 0,
    failures: 0,
    loaded: false,
    lastUpdate: 0,
  };

  // ---------------------------------------------------------------- storage

  const store = {
    get() { try { return localStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; } },
    set(v) { try { localStorage.setItem(TOKEN_KEY, v); } catch { /* storage disabled: keep it in memory */ } },
    clear() { try { localStorage.removeItem(TOKEN_KEY); } catch { /* ignore */ } },
  };

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message, field) {
      super(message);
      this.name = 'ApiError';
      this.status = status;
      this.code = code;
      this.field = field || null;
    }
  }

  async function api(path, { method = 'GET', signal } = {}) {
    let res;
    try {
      res = await fetch(new URL(path, apiBase), {
        method,
        signal,
        cache: 'no-store',
        headers: { Authorization: `Bearer ${state.token}`, Accept: 'application/json' },
      });
    } catch (err) {
      if (err && err.name === 'AbortError') throw err;
      throw new ApiError(0, 'network', "can't reach the API");
    }
    const text = await res.text();
    let body = null;
    if (text) {
      try { body = JSON.parse(text); } catch { body = null; }
    }
    if (!res.ok) {
      const e = (body && typeof body.error === 'object' && body.error) || {};
      let message = e.message || (body && typeof body.detail === 'string' && body.detail) || res.statusText;
      if (!message) message = `HTTP ${res.status}`;
      throw new ApiError(res.status, e.code || `http_${res.status}`, message, e.field);
    }
    return body;
  }

  const jobPath = (id) => `jobs/${encodeURIComponent(id)}`;

  function describeError(err) {
    if (!err) return 'unknown error';
    if (err.status) return `${err.message} (HTTP ${err.status})`;
    return err.message || String(err);
  }

  // ---------------------------------------------------------------- formatting

  function fmtClock(seconds) {
    if (seconds == null || !Number.isFinite(seconds)) return '—';
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const ss = s % 60;
    if (h) return `${h}h ${String(m).padStart(2, '0')}m`;
    if (m) return `${m}m ${String(ss).padStart(2, '0')}s`;
    return `${ss}s`;
  }

  function fmtApprox(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 90) return `${s} s`;
    const m = Math.round(s / 60);
    if (m < 90) return `${m} min`;
    const h = Math.floor(m / 60);
    return `${h} h ${m % 60} min`;
  }

  function fmtAgo(unix) {
    if (!Number.isFinite(unix)) return '';
    const d = Date.now() / 1000 - unix;
    if (d < 45) return 'just now';
    if (d < 3600) return `${Math.round(d / 60)} min ago`;
    if (d < 86400) return `${Math.round(d / 3600)} h ago`;
    return new Date(unix * 1000).toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
  }

  const fmtDate = (unix) => (Number.isFinite(unix) ? new Date(unix * 1000).toLocaleString() : '');

  // Only http(s) URLs (absolute or relative to this page) ever reach a src or href.
  function safeUrl(url) {
    if (typeof url !== 'string' || !url) return null;
    try {
      const u = new URL(url, document.baseURI);
      return u.protocol === 'http:' || u.protocol === 'https:' ? u.href : null;
    } catch {
      return null;
    }
  }

  const setText = (el, text) => { if (el.textContent !== text) el.textContent = text; };
  const show = (el, on) => { if (el.hidden === on) el.hidden = !on; };

  // ---------------------------------------------------------------- views

  function showAuth(message) {
    stopPolling();
    show(ui.jobsView, false);
    show(ui.changeToken, false);
    show(ui.connection, false);
    show(ui.auth, true);
    setText(ui.authError, message || '');
    show(ui.authError, Boolean(message));
    ui.connect.disabled = false;
    setText(ui.connect, 'Connect');
    ui.tokenInput.value = '';
    ui.tokenInput.setAttribute('aria-invalid', message ? 'true' : 'false');
    ui.tokenInput.focus();
  }

  function showJobs() {
    if (!ui.jobsView.hidden) return;
    show(ui.auth, false);
    show(ui.jobsView, true);
    show(ui.changeToken, true);
    show(ui.connection, true);
  }

  function setBanner(message) {
    setText(ui.banner, message || '');
    show(ui.banner, Boolean(message));
  }

  function setConnection(status, text) {
    ui.connection.dataset.status = status;
    setText($('.conn-text', ui.connection), text);
  }

  function updateConnectionText() {
    if (state.failures || !state.lastUpdate) return;
    const ago = Math.round((Date.now() - state.lastUpdate) / 1000);
    const live = anyActive();
    setConnection(live ? 'live' : 'ok', `${live ? 'Live' : 'Up to date'} · updated ${ago < 2 ? 'just now' : `${ago} s ago`}`);
  }

  // ---------------------------------------------------------------- auth

  function unauthorized(err) {
    resetList();
    state.token = '';
    store.clear();
    const why = err && err.message ? ` (${err.message})` : '';
    showAuth(`The API did not accept that token${why}. Check it and enter it again.`);
  }

  ui.authForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = ui.tokenInput.value.trim();
    if (!token) {
      setText(ui.authError, 'Enter a token first.');
      show(ui.authError, true);
      ui.tokenInput.setAttribute('aria-invalid', 'true');
      ui.tokenInput.focus();
      return;
    }
    ui.connect.disabled = true;
    setText(ui.connect, 'Connecting…');
    state.token = token;
    resetList();
    requestRefresh();
  });

  ui.changeToken.addEventListener('click', () => {
    resetList();
    state.token = '';
    store.clear();
    showAuth('');
  });

  // ---------------------------------------------------------------- list loading

  // All list work (refreshes, "load more") runs one at a time on this chain.
  let chain = Promise.resolve();
  let refreshQueued = false;

  function enqueue(task) {
    chain = chain.then(task).catch((err) => console.error('lipfarm:', err));
    return chain;
  }

  function requestRefresh() {
    clearTimeout(state.timer);
    if (refreshQueued) return chain;
    refreshQueued = true;
    return enqueue(async () => {
      refreshQueued = false;
      await doRefresh();
    });
  }

  function stopPolling() {
    clearTimeout(state.timer);
    state.timer = 0;
  }

  function anyActive() {
    for (const row of state.rows.values()) if (ACTIVE.has(row.job.state)) return true;
    return false;
  }

  function schedule() {
    clearTimeout(state.timer);
    if (!state.token) return;
    let delay;
    if (state.failures) delay = Math.min(FAST_MS * 2 ** (state.failures - 1), MAX_BACKOFF_MS);
    else if (document.hidden) delay = HIDDEN_MS;
    else delay = anyActive() ? FAST_MS : SLOW_MS;
    state.timer = setTimeout(requestRefresh, delay);
    return delay;
  }

  function resetList() {
    state.generation += 1;
    state.controller.abort();
    state.controller = new AbortController();
    stopPolling();
    for (const row of state.rows.values()) closeAllPlayers(row);
    for (const row of state.rows.values()) row.el.remove();
    state.rows.clear();
    state.nextCursor = null;
    state.wanted = PAGE_SIZE;
    state.failures = 0;
    state.loaded = false;
    state.lastUpdate = 0;
    setBanner('');
    show(ui.more, false);
    setText(ui.empty, 'Loading jobs…');
    show(ui.empty, true);
  }

  function listQuery(limit, cursor) {
    const q = new URLSearchParams();
    if (state.filter) q.set('state', state.filter);
    q.set('limit', String(limit));
    if (cursor) q.set('cursor', cursor);
    return `jobs?${q}`;
  }

  // The first `count` jobs of the listing, following next_cursor if the server caps `limit`.
  async function fetchListing(count, signal) {
    const jobs = new Map();
    let cursor = null;
    for (let pages = 0; pages < MAX_PAGES_PER_REFRESH; pages += 1) {
      const page = await api(listQuery(count - jobs.size, cursor), { signal });
      const got = Array.isArray(page && page.jobs) ? page.jobs : [];
      for (const job of got) if (job && job.id != null && !jobs.has(job.id)) jobs.set(job.id, job);
      cursor = (page && page.next_cursor) || null;
      if (!cursor || !got.length || jobs.size >= count) break;
    }
    return { jobs: [...jobs.values()], cursor };
  }

  async function doRefresh() {
    if (!state.token) return;
    const gen = state.generation;
    const { signal } = state.controller;
    try {
      const { jobs, cursor } = await fetchListing(state.wanted, signal);
      // A row whose player is open stays, even when it drops out of the listing.
      const listed = new Set(jobs.map((j) => j.id));
      const kept = [...state.rows.values()].filter((r) => !listed.has(r.job.id) && hasPlayer(r));
      for (const row of kept) {
        try {
          jobs.push(await api(jobPath(row.job.id), { signal }));
        } catch (err) {
          if (err.status === 401 || err.name === 'AbortError') throw err;
          jobs.push(row.job);
        }
      }
      if (gen !== state.generation) return;
      if (kept.length) jobs.sort((a, b) => (b.created_at || 0) - (a.created_at || 0));
      render(jobs, { replace: true });
      state.nextCursor = cursor;
      afterLoad();
    } catch (err) {
      if (gen !== state.generation || (err && err.name === 'AbortError')) return;
      loadFailed(err);
    } finally {
      if (gen === state.generation) schedule();
    }
  }

  async function doMore() {
    if (!state.token || !state.nextCursor) return;
    const gen = state.generation;
    const { signal } = state.controller;
    ui.more.disabled = true;
    setText(ui.more, 'Loading…');
    try {
      const page = await api(listQuery(PAGE_SIZE, state.nextCursor), { signal });
      if (gen !== state.generation) return;
      const jobs = (Array.isArray(page && page.jobs) ? page.jobs : []).filter((j) => j && !state.rows.has(j.id));
      render(jobs, { replace: false });
      state.nextCursor = (page && page.next_cursor) || null;
      state.wanted = Math.max(state.wanted, state.rows.size);
      afterLoad();
    } catch (err) {
      if (gen !== state.generation || (err && err.name === 'AbortError')) return;
      loadFailed(err);
    } finally {
      ui.more.disabled = false;
      setText(ui.more, 'Load more');
    }
  }

  function afterLoad() {
    state.failures = 0;
    state.loaded = true;
    state.lastUpdate = Date.now();
    store.set(state.token);
    setBanner('');
    showJobs();
    show(ui.more, Boolean(state.nextCursor));
    const none = state.rows.size === 0;
    if (none) setText(ui.empty, state.filter ? `No ${STATE_LABEL[state.filter].toLowerCase()} jobs.` : 'No jobs yet.');
    show(ui.empty, none);
    updateConnectionText();
  }

  function loadFailed(err) {
    if (err && err.status === 401) {
      unauthorized(err);
      return;
    }
    state.failures += 1;
    if (!state.loaded && !ui.auth.hidden && state.rows.size === 0 && err.status === 0) {
      // First contact failed before we know whether the token is good: say so on the form.
      ui.connect.disabled = false;
      setText(ui.connect, 'Connect');
      setText(ui.authError, `Couldn't reach the API at ${apiBase.pathname}: ${describeError(err)}. Retrying…`);
      show(ui.authError, true);
      return;
    }
    showJobs();
    const wait = Math.round(Math.min(FAST_MS * 2 ** (state.failures - 1), MAX_BACKOFF_MS) / 1000);
    setBanner(`Couldn't refresh the jobs: ${describeError(err)}. Retrying in ${wait} s.`);
    setConnection('error', 'Connection problem');
    if (!state.loaded) setText(ui.empty, 'No jobs loaded yet.');
  }

  ui.more.addEventListener('click', () => enqueue(doMore));
  ui.refresh.addEventListener('click', () => requestRefresh());

  ui.filter.addEventListener('change', () => {
    state.filter = ui.filter.value;
    const url = new URL(window.location.href);
    url.hash = state.filter ? `state=${state.filter}` : '';
    history.replaceState(null, '', url.hash ? url.href : url.href.replace(/#.*$/, ''));
    resetList();
    requestRefresh();
  });

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && state.token) requestRefresh();
  });

  setInterval(updateConnectionText, 1000);

  // ---------------------------------------------------------------- rendering

  function render(jobs, { replace }) {
    const seen = new Set();
    // Rows are only moved when out of place, so open players keep playing and focus stays put.
    let anchor = replace ? ui.table.tHead : ui.table.lastElementChild;
    for (const job of jobs) {
      let row = state.rows.get(job.id);
      if (!row) {
        row = createRow(job);
        state.rows.set(job.id, row);
      }
      updateRow(row, job);
      seen.add(job.id);
      if (anchor.nextElementSibling !== row.el) ui.table.insertBefore(row.el, anchor.nextElementSibling);
      anchor = row.el;
    }
    if (!replace) return;
    for (const [id, row] of state.rows) {
      if (seen.has(id)) continue;
      closeAllPlayers(row);
      row.el.remove();
      state.rows.delete(id);
    }
  }

  function createRow(job) {
    const el = ui.template.content.firstElementChild.cloneNode(true);
    const f = (name) => el.querySelector(`[data-field="${name}"]`);
    const r = (name) => el.querySelector(`[data-role="${name}"]`);
    const row = {
      el,
      job,
      id: f('id'),
      head: el.querySelector('.job-id'),
      created: f('created'),
      priority: f('priority'),
      avatar: f('avatar'),
      audio: f('audio'),
      badge: f('state'),
      progress: f('progress'),
      pct: f('pct'),
      frames: f('frames'),
      eta: f('eta'),
      chunks: f('chunks'),
      chunksKey: null,
      elapsed: f('elapsed'),
      play: r('play'),
      live: r('watch-live'),
      download: r('download'),
      cancel: r('cancel'),
      detail: r('detail'),
      reason: r('reason'),
      error: r('row-error'),
      players: r('players'),
      output: null,       // open output player: { box, video }
      livePlayer: null,   // open live player: { box, video, hls }
      cancelling: false,
      errorTimer: 0,
    };
    el.dataset.jobId = job.id;
    const detailId = `job-detail-${String(job.id).replace(/[^\w-]/g, '_')}`;
    row.detail.id = detailId;
    row.play.setAttribute('aria-controls', detailId);
    row.live.setAttribute('aria-controls', detailId);
    row.play.addEventListener('click', () => (row.output ? closePlayer(row, 'output') : openOutput(row)));
    row.live.addEventListener('click', () => (row.livePlayer ? closePlayer(row, 'live') : openLive(row)));
    row.cancel.addEventListener('click', () => cancelJob(row));
    return row;
  }

  function updateRow(row, job) {
    row.job = job;
    const { el } = row;
    const id = String(job.id);
    const st = STATE_LABEL[job.state] ? job.state : 'queued';
    if (el.dataset.state !== job.state) el.dataset.state = job.state;

    setText(row.id, id);
    row.id.title = id;
    setText(row.created, fmtAgo(job.created_at));
    if (Number.isFinite(job.created_at)) row.created.dateTime = new Date(job.created_at * 1000).toISOString();
    row.created.title = `Created ${fmtDate(job.created_at)}`;
    setText(row.priority, job.priority != null && job.priority !== 0 ? ` · priority ${job.priority}` : '');

    setText(row.avatar, job.avatar || '—');
    row.avatar.title = job.avatar || '';
    setText(row.audio, job.audio || '');
    row.audio.title = job.audio || '';

    row.badge.className = `badge badge-${st}`;
    setText(row.badge, STATE_LABEL[job.state] || String(job.state || 'unknown'));

    updateProgress(row, job);
    updateChunks(row, job.chunks || {});

    setText(row.elapsed, fmtClock(job.elapsed_s));
    row.elapsed.title = job.finished_at ? `Finished ${fmtDate(job.finished_at)}` : '';

    // Actions
    const active = ACTIVE.has(job.state);
    const output = job.state === 'done' ? safeUrl(job.output_url) : null;
    const playlist = job.state !== 'done' ? safeUrl(job.playlist_url) : null;
    show(row.play, Boolean(output) || Boolean(row.output));
    setText(row.play, row.output ? 'Hide' : 'Play');
    row.play.setAttribute('aria-expanded', String(Boolean(row.output)));
    row.play.setAttribute('aria-label', `${row.output ? 'Hide' : 'Play'} the output of job ${id}`);
    show(row.live, Boolean(playlist) || Boolean(row.livePlayer));
    setText(row.live, row.livePlayer ? 'Stop live' : 'Watch live');
    row.live.setAttribute('aria-expanded', String(Boolean(row.livePlayer)));
    row.live.setAttribute('aria-label', `${row.livePlayer ? 'Stop live' : 'Watch live'}: job ${id}`);
    show(row.download, Boolean(output));
    if (output && row.download.href !== output) row.download.href = output;
    row.download.setAttribute('aria-label', `Download the output of job ${id}`);
    const hadFocus = row.cancel.contains(document.activeElement);
    show(row.cancel, active);
    row.cancel.disabled = row.cancelling;
    setText(row.cancel, row.cancelling ? 'Cancelling…' : 'Cancel');
    row.cancel.setAttribute('aria-label', `Cancel job ${id}`);
    if (hadFocus && !active) row.head.focus({ preventScroll: true });

    // Reason for failed / cancelled jobs
    const showReason = (job.state === 'failed' || job.state === 'cancelled') && Boolean(job.reason);
    setText(row.reason, showReason ? job.reason : '');
    show(row.reason, showReason);
    updateDetail(row);
  }

  function updateProgress(row, job) {
    const total = Number(job.frames_total) || 0;
    const done = Math.max(0, Math.min(Number(job.frames_done) || 0, total || Infinity));
    const p = row.progress;
    let fraction;
    if (job.state === 'done') fraction = 1;
    else if (total > 0) fraction = done / total;
    else fraction = null;

    if (total > 0) {
      if (p.max !== total) p.max = total;
      const v = job.state === 'done' ? total : done;
      if (!p.hasAttribute('value') || p.value !== v) p.value = v;
    } else if (fraction === 1) {
      p.max = 1;
      p.value = 1;
    } else if (ACTIVE.has(job.state)) {
      p.removeAttribute('value'); // indeterminate: frame count not known yet
    } else {
      p.max = 1;
      p.value = 0;
    }
    p.dataset.progress = fraction == null ? '' : fraction.toFixed(4);

    const pct = fraction == null ? '' : `${Math.floor(fraction * 100)}%`;
    setText(row.pct, pct);
    setText(row.frames, total > 0 ? `${done.toLocaleString()} / ${total.toLocaleString()} frames` : '');
    let eta = '';
    if (job.state === 'queued') eta = 'Waiting for a worker';
    else if (job.state === 'planning') eta = 'Planning chunks';
    else if (job.state === 'finalizing') eta = job.eta_s != null ? `Finalizing · about ${fmtApprox(job.eta_s)} left` : 'Finalizing output';
    else if (job.state === 'rendering' && job.eta_s != null && Number.isFinite(job.eta_s)) eta = `about ${fmtApprox(job.eta_s)} left`;
    setText(row.eta, eta);
    p.setAttribute('aria-label', `Frames rendered for job ${job.id}`);
    const valueText = [pct || 'Not started', eta].filter(Boolean).join(', ');
    if (p.getAttribute('aria-valuetext') !== valueText) p.setAttribute('aria-valuetext', valueText);
  }

  function updateChunks(row, chunks) {
    const entries = CHUNK_ORDER.filter((k) => chunks[k] > 0).map((k) => [k, chunks[k]]);
    for (const k of Object.keys(chunks)) if (!CHUNK_ORDER.includes(k) && chunks[k] > 0) entries.push([k, chunks[k]]);
    const key = JSON.stringify(entries);
    if (key === row.chunksKey) return;
    row.chunksKey = key;
    const items = entries.map(([k, n]) => {
      const li = document.createElement('li');
      li.className = `chunk chunk-${k.replace(/[^\w-]/g, '')}`;
      li.dataset.chunkState = k;
      li.title = `${n} ${k}`;
      const count = document.createElement('b');
      count.textContent = String(n);
      li.append(count, ` ${k}`);
      return li;
    });
    if (!items.length) {
      const li = document.createElement('li');
      li.className = 'chunk chunk-none';
      li.textContent = '—';
      items.push(li);
    }
    row.chunks.replaceChildren(...items);
  }

  function updateDetail(row) {
    show(row.detail, !row.reason.hidden || !row.error.hidden || hasPlayer(row));
    row.el.classList.toggle('has-player', hasPlayer(row));
  }

  function rowError(row, message) {
    clearTimeout(row.errorTimer);
    setText(row.error, message || '');
    show(row.error, Boolean(message));
    updateDetail(row);
    if (message) row.errorTimer = setTimeout(() => rowError(row, ''), 10000);
  }

  // ---------------------------------------------------------------- cancel

  async function cancelJob(row) {
    if (row.cancelling) return;
    row.cancelling = true;
    updateRow(row, row.job);
    const gen = state.generation;
    try {
      const res = await api(jobPath(row.job.id), { method: 'DELETE' });
      row.cancelling = false;
      rowError(row, '');
      if (gen === state.generation && state.rows.get(row.job.id) === row) {
        updateRow(row, { ...row.job, state: (res && res.state) || 'cancelled', eta_s: null });
      }
    } catch (err) {
      row.cancelling = false;
      if (err.status === 401) {
        unauthorized(err);
        return;
      }
      if (gen === state.generation) {
        updateRow(row, row.job);
        rowError(row, err.status === 409 ? 'This job had already ended, so there was nothing to cancel.'
          : `Couldn't cancel this job: ${describeError(err)}.`);
      }
    }
    if (gen === state.generation) requestRefresh();
  }

  // ---------------------------------------------------------------- players

  const hasPlayer = (row) => Boolean(row.output || row.livePlayer);

  function playerBox(title, role) {
    const box = document.createElement('figure');
    box.className = `player player-${role}`;
    const video = document.createElement('video');
    video.controls = true;
    video.playsInline = true;
    video.preload = 'metadata';
    video.dataset.role = role === 'live' ? 'live-player' : 'output-player';
    const cap = document.createElement('figcaption');
    const label = document.createElement('span');
    label.textContent = title;
    const status = document.createElement('span');
    status.className = 'player-status';
    status.setAttribute('role', 'status');
    cap.append(label, status);
    box.append(video, cap);
    video.setAttribute('aria-label', title);
    return { box, video, status };
  }

  function startPlayback(video) {
    const p = video.play();
    if (p && typeof p.catch === 'function') p.catch(() => { /* autoplay refused: the controls are there */ });
  }

  function openOutput(row) {
    const url = safeUrl(row.job.output_url);
    if (!url) return;
    const player = playerBox(`Output of job ${row.job.id}`, 'output');
    player.video.addEventListener('error', () => {
      setText(player.status, 'The video could not be loaded (its link may have expired). Press Hide, then Play to retry.');
    });
    player.video.src = url;
    row.output = player;
    row.players.prepend(player.box);
    updateRow(row, row.job);
    startPlayback(player.video);
  }

  let hlsLoading = null;
  function loadHls() {
    if (window.Hls) return Promise.resolve(window.Hls);
    if (!hlsLoading) {
      hlsLoading = new Promise((resolve) => {
        const s = document.createElement('script');
        s.src = new URL('vendor/hls.min.js', document.baseURI).href;
        s.async = true;
        s.onload = () => resolve(window.Hls || null);
        s.onerror = () => resolve(null);
        document.head.append(s);
      });
    }
    return hlsLoading;
  }

  async function openLive(row) {
    const url = safeUrl(row.job.playlist_url);
    if (!url) return;
    const player = playerBox(`Live preview of job ${row.job.id}`, 'live');
    player.hls = null;
    row.livePlayer = player;
    row.players.append(player.box);
    updateRow(row, row.job);
    setText(player.status, 'Connecting…');
    player.video.addEventListener('playing', () => setText(player.status, ''), { once: true });

    const Hls = await loadHls();
    if (row.livePlayer !== player) return; // closed while loading
    const video = player.video;
    if (Hls && typeof Hls.isSupported === 'function' && Hls.isSupported()) {
      const hls = new Hls({ enableWorker: true, lowLatencyMode: false });
      player.hls = hls;
      let retries = 0;
      hls.on(Hls.Events.ERROR, (_evt, data) => {
        if (!data || !data.fatal) return;
        if (data.type === Hls.ErrorTypes.NETWORK_ERROR && retries < 5) {
          retries += 1;
          setText(player.status, 'Connection lost, retrying…');
          setTimeout(() => { if (player.hls === hls) hls.startLoad(); }, 1000 * retries);
        } else if (data.type === Hls.ErrorTypes.MEDIA_ERROR && retries < 5) {
          retries += 1;
          hls.recoverMediaError();
        } else {
          setText(player.status, 'Live playback stopped: the stream could not be loaded.');
          hls.destroy();
          player.hls = null;
        }
      });
      hls.on(Hls.Events.MANIFEST_PARSED, () => startPlayback(video));
      hls.loadSource(url);
      hls.attachMedia(video);
      player.engine = 'hls.js';
    } else if (video.canPlayType('application/vnd.apple.mpegurl')) {
      video.addEventListener('error', () => setText(player.status, 'Live playback stopped: the stream could not be loaded.'));
      video.src = url;
      player.engine = 'native';
      startPlayback(video);
    } else {
      setText(player.status, "This browser can't play live HLS video, and hls.js (vendor/hls.min.js) isn't available.");
      player.engine = 'none';
    }
    video.dataset.engine = player.engine;
  }

  function closePlayer(row, which) {
    const player = which === 'live' ? row.livePlayer : row.output;
    if (!player) return;
    if (player.hls) {
      player.hls.destroy();
      player.hls = null;
    }
    player.video.pause();
    player.video.removeAttribute('src');
    player.video.load();
    player.box.remove();
    if (which === 'live') row.livePlayer = null;
    else row.output = null;
    updateRow(row, row.job);
  }

  function closeAllPlayers(row) {
    closePlayer(row, 'output');
    closePlayer(row, 'live');
  }

  // ---------------------------------------------------------------- start

  function start() {
    const m = /(?:^|[#&])state=([a-z]+)/.exec(window.location.hash);
    if (m && STATE_LABEL[m[1]]) {
      state.filter = m[1];
      ui.filter.value = m[1];
    }
    state.token = store.get();
    if (!state.token) {
      showAuth('');
      return;
    }
    showJobs();
    setConnection('idle', 'Connecting…');
    requestRefresh();
  }

  start();
})();
