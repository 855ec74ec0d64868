"""The Lua scripts behind every chunk move and job move, each one atomic step with its checks.

Redis runs a script without interleaving other commands, so a check ("does this token still own the
chunk?") and the write it guards cannot be separated by another client. ``common.state.store``
calls them; nothing else does. Field names are those of ``common.state.records``.

Every script gets the same KEYS, so the helpers below can reach what they need:

    KEYS[1] job hash        KEYS[2] chunk hash (or '' for job scripts)   KEYS[3] chunk leases
    KEYS[4] active jobs     KEYS[5] attempt log of the chunk or the finalizer
    KEYS[6] ended jobs not yet recorded in storage (the outbox)          KEYS[7] finalizer leases
    KEYS[8] farm-wide totals (the commit counts its frames there, for /metrics)

and ARGV[1] = job id, ARGV[2] = chunk index (or 'finalize'), ARGV[3] = now, ARGV[4] = the key
prefix of the job's chunks and attempt logs (``<prefix>:chunk:<job>:``, ``<prefix>:attempts:<job>:``)
and the farm's key prefix, joined by spaces. The fair-share keys (``common.state.keys``, under
``<prefix>:sched:``) and another job's keys, for ``CLAIM_NEXT``, are built from that prefix. Ending a job touches all of its chunks, whose keys come from that prefix:
a single Redis server is assumed (no cluster).

A chunk's ``attempt`` numbers its attempts (1, 2, ...; never reused) and ``spent`` counts those
charged against the attempt limit (a worker shutting down hands its charge back; a chunk whose
committed segment is lost starts a fresh count). Each attempt's start and end go to an attempt
log, a list of JSON events: who rendered what, when, and how each attempt ended.
"""

PRELUDE = """
local job, chunk, leases, active, log, unrecorded, final_leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local job_id, index, now = ARGV[1], ARGV[2], ARGV[3]
local chunk_prefix, log_prefix, root = string.match(ARGV[4], '^(%S+) (%S+) (%S+)$')
local member = job_id .. ':' .. index

-- Fair share (docs/scheduling.md). A planned job offers its chunks in its priority's lane: they wait
-- in a sorted set, and the job in its tenant's lane; a lane's render message is a slot that
-- CLAIM_NEXT binds, when a worker takes it, to the least served tenant (running chunks / weight),
-- then that tenant's job with the fewest running chunks (the oldest first), then its lowest chunk.
local function sched(...) return root .. ':sched:' .. table.concat({...}, ':') end
local function job_of(jkey)
  local tenant = redis.call('HGET', jkey, 'tenant')
  if not tenant or tenant == '' then tenant = 'default' end
  return redis.call('HGET', jkey, 'priority') or 'normal', tenant
end
local function job_score(jkey)
  return tonumber(redis.call('HGET', jkey, 'running') or '0') * 1e12 + tonumber(redis.call('HGET', jkey, 'created_at') or '0')
end
local function tenant_score(p, tenant)
  local weight = tonumber(redis.call('HGET', sched('weights'), tenant) or '1')
  if not weight or weight <= 0 then weight = 1 end
  return tonumber(redis.call('HGET', sched('running', p), tenant) or '0') / weight
end
-- Refresh the job's place in its lane and its tenant's among the lane's tenants, where present.
local function reschedule(jkey, jid)
  local p, tenant = job_of(jkey)
  if redis.call('ZSCORE', sched('lane', p, tenant), jid) then
    redis.call('ZADD', sched('lane', p, tenant), job_score(jkey), jid)
  end
  if redis.call('ZSCORE', sched('tenants', p), tenant) then
    redis.call('ZADD', sched('tenants', p), tenant_score(p, tenant), tenant)
  end
end
-- The current job's running chunks went up or down by one (a claim; a commit, requeue, failure...).
local function running_changed(delta)
  local p, tenant = job_of(job)
  if redis.call('HINCRBY', job, 'running', delta) < 0 then redis.call('HSET', job, 'running', 0) end
  if redis.call('HINCRBY', sched('running', p), tenant, delta) <= 0 then redis.call('HDEL', sched('running', p), tenant) end
  reschedule(job, job_id)
end
-- A chunk bound by its own message (a retry, a fast start, a re-send) leaves the lane's waiting set.
local function unoffer(jid, i)
  local waiting = sched('waiting', jid)
  if redis.call('ZREM', waiting, i) == 1 and redis.call('ZCARD', waiting) == 0 then
    local p, tenant = job_of(root .. ':job:' .. jid)
    redis.call('ZREM', sched('lane', p, tenant), jid)
  end
end

local function event(log_key, attempt, name, reason, worker)
  redis.call('RPUSH', log_key, cjson.encode({attempt = tonumber(attempt) or 0, event = name,
    at = tonumber(now), worker = worker or '', reason = reason or ''}))
end
-- The wait before a requeued chunk's next attempt: ARGV schedule "d0,d1,..." indexed by attempts
-- spent (the retry rule, computed by the caller: common.retry).
local function retry_delay(schedule, spent)
  local i = 0
  for d in string.gmatch(schedule, '[^,]+') do
    if i == spent then return tonumber(d) end
    i = i + 1
  end
  return 0
end
local function log_event(name, reason, worker)
  event(log, redis.call('HGET', chunk, 'attempt'), name, reason, worker or redis.call('HGET', chunk, 'worker'))
end

-- Stop a chunk of an ended job: queued ones are dropped, a running attempt ends (its commit will
-- be refused and its heartbeat told to stop).
local function stop_chunk_at(key, log_key, i, reason)
  local state = redis.call('HGET', key, 'state')
  if state == 'running' then
    event(log_key, redis.call('HGET', key, 'attempt'), 'stopped', reason, redis.call('HGET', key, 'worker'))
    redis.call('ZREM', leases, job_id .. ':' .. i)
    running_changed(-1)
  end
  if state == 'running' or state == 'queued' then
    redis.call('HSET', key, 'state', 'cancelled', 'reason', reason, 'updated_at', now, 'token', '')
  end
end

-- End a job (failed or cancelled) with everything it has in flight: one atomic step, so an ended
-- job never has a running or queued chunk, and it goes to the outbox of ends to record in storage.
local function end_job(state, reason)
  local js = redis.call('HGET', job, 'state')
  if js == 'done' or js == 'failed' or js == 'cancelled' then return false end
  redis.call('HSET', job, 'state', state, 'reason', reason, 'updated_at', now, 'finished_at', now)
  redis.call('HINCRBY', KEYS[8], 'jobs_' .. state, 1)  -- ended jobs counted as they end, for /metrics
  redis.call('SREM', active, job_id)
  redis.call('SADD', unrecorded, job_id)
  if redis.call('ZSCORE', final_leases, job_id) then
    event(log_prefix .. 'finalize', redis.call('HGET', job, 'finalize_attempt'), state, reason,
          redis.call('HGET', job, 'finalizer'))
    redis.call('ZREM', final_leases, job_id)
  end
  local total = tonumber(redis.call('HGET', job, 'chunks_total') or '0')
  for i = 0, total - 1 do
    stop_chunk_at(chunk_prefix .. i, log_prefix .. i, i, 'job ' .. state)
  end
  local p, tenant = job_of(job)
  redis.call('DEL', sched('waiting', job_id))
  redis.call('ZREM', sched('lane', p, tenant), job_id)
  return true
end

local function fail_chunk(reason)
  if redis.call('HGET', chunk, 'state') == 'running' then
    log_event('failed', reason)
    running_changed(-1)
  end
  redis.call('HSET', chunk, 'state', 'failed', 'reason', reason, 'updated_at', now, 'token', '')
  redis.call('ZREM', leases, member)
  end_job('failed', 'chunk ' .. index .. ' (frames ' .. redis.call('HGET', chunk, 'start_frame') .. '-' ..
          (tonumber(redis.call('HGET', chunk, 'stop_frame')) - 1) .. ') failed: ' .. reason)
end

local function owned_by(token)
  return redis.call('HGET', chunk, 'state') == 'running' and redis.call('HGET', chunk, 'token') == token
end
"""

# ARGV[5] worker, [6] token, [7] lease deadline, [8] max attempts, [9] worker's process start
CLAIM_FN = """
local function claim_chunk()
local js = redis.call('HGET', job, 'state')
local state = redis.call('HGET', chunk, 'state')
if not state then return {'skip', 'no such chunk'} end
if js ~= 'rendering' then return {'skip', 'job is ' .. tostring(js)} end
if state == 'running' then
  local lease = tonumber(redis.call('ZSCORE', leases, member) or '0')
  if lease > tonumber(now) then
    return {'skip', 'running in another attempt', redis.call('HGET', chunk, 'worker') or '',
            redis.call('HGET', chunk, 'worker_started') or '', redis.call('HGET', chunk, 'token') or ''}
  end
  log_event('expired', 'lease expired: taken over')
  redis.call('HSET', chunk, 'state', 'queued')  -- that attempt is over; this claim starts the next
  running_changed(-1)
elseif state ~= 'queued' then
  return {'skip', 'chunk is ' .. state}
else
  -- A requeued chunk waits out its retry delay whatever message comes first (a copy redelivered
  -- from a dead process would otherwise start it at once): the caller queues it again for then.
  local wait = tonumber(redis.call('HGET', chunk, 'not_before') or '0') - tonumber(now)
  if wait > 0 then return {'later', tostring(wait)} end
end
local spent = tonumber(redis.call('HGET', chunk, 'spent') or '0')
local max_attempts = tonumber(ARGV[8])
if spent >= max_attempts then
  fail_chunk('out of attempts (' .. spent .. ' of ' .. max_attempts .. '); last: ' ..
             (redis.call('HGET', chunk, 'reason') or ''))
  return {'failed', 'out of attempts'}
end
local attempt = tonumber(redis.call('HGET', chunk, 'attempt') or '0') + 1
redis.call('HSET', chunk, 'state', 'running', 'attempt', attempt, 'spent', spent + 1, 'token', ARGV[6],
           'worker', ARGV[5], 'worker_started', ARGV[9], 'started_at', now, 'updated_at', now,
           'beat_at', now, 'frames_done', 0)
redis.call('ZADD', leases, ARGV[7], member)
log_event('started', '', ARGV[5])
unoffer(job_id, index)
running_changed(1)
if not redis.call('HGET', job, 'rendering_at') then redis.call('HSET', job, 'rendering_at', now) end
return {'ok', tostring(attempt)}
end
"""

CLAIM = PRELUDE + CLAIM_FN + """
return claim_chunk()
"""

# A lane's slot: bind it to the chunk fair share picks (see PRELUDE), and claim that. ARGV[1] and [2]
# are '' (the caller does not know them), [5..9] as CLAIM, [10] the lane (a priority). Answers as
# CLAIM with the job id and chunk index appended, or {'empty'} when nothing waits in the lane.
# Jobs that ended or hold nothing any more are dropped from the lane on the way.
CLAIM_NEXT = PRELUDE + CLAIM_FN + """
local p = ARGV[10]
for _ = 1, 100 do
  local tenant = redis.call('ZRANGE', sched('tenants', p), 0, 0)[1]
  if not tenant then return {'empty'} end
  local lane = sched('lane', p, tenant)
  local jid = redis.call('ZRANGE', lane, 0, 0)[1]
  if not jid then
    redis.call('ZREM', sched('tenants', p), tenant)
  else
    local waiting = sched('waiting', jid)
    local i = redis.call('ZRANGE', waiting, 0, 0)[1]
    if not i or redis.call('HGET', root .. ':job:' .. jid, 'state') ~= 'rendering' then
      redis.call('ZREM', lane, jid)
      redis.call('DEL', waiting)
    else
      job_id, index, member = jid, i, jid .. ':' .. i
      job, chunk_prefix, log_prefix = root .. ':job:' .. jid, root .. ':chunk:' .. jid .. ':', root .. ':attempts:' .. jid .. ':'
      chunk, log = chunk_prefix .. i, log_prefix .. i
      unoffer(jid, i)
      local answer = claim_chunk()
      if answer[1] == 'ok' or answer[1] == 'failed' then
        table.insert(answer, jid)
        table.insert(answer, i)
        return answer
      end
    end
  end
end
return {'empty'}
"""

# The planner offers a job's chunks (ARGV[5...]) in its lane; it then sends one slot message for each.
OFFER = PRELUDE + """
if redis.call('HGET', job, 'state') ~= 'rendering' then return '0' end
local p, tenant = job_of(job)
for n = 5, #ARGV do
  redis.call('ZADD', sched('waiting', job_id), tonumber(ARGV[n]), ARGV[n])
end
redis.call('ZADD', sched('lane', p, tenant), job_score(job), job_id)
redis.call('ZADD', sched('tenants', p), tenant_score(p, tenant), tenant)
return tostring(#ARGV - 4)
"""

# ARGV[5] token, [6] lease deadline, [7] frames done, [8] peak rss bytes
BEAT = PRELUDE + """
if not owned_by(ARGV[5]) then return 'lost' end
if redis.call('HGET', job, 'state') ~= 'rendering' then return 'stopped' end
redis.call('ZADD', leases, ARGV[6], member)
redis.call('HSET', chunk, 'frames_done', ARGV[7], 'beat_at', now, 'peak_rss', ARGV[8])
return 'ok'
"""

# ARGV[5] token, [6] frames, [7] segment key, [8] segment size, [9] segment sha256,
# [10] HLS segment key, [11] its size, [12] its sha256
COMMIT = PRELUDE + """
local state = redis.call('HGET', chunk, 'state')
if state == 'committed' then return {'duplicate'} end
if not owned_by(ARGV[5]) then return {'stale', tostring(state)} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then return {'refused', 'job is ' .. tostring(js)} end
redis.call('HSET', chunk, 'state', 'committed', 'committed_at', now, 'updated_at', now, 'frames_done', ARGV[6],
           'reason', '', 'token', '', 'segment_key', ARGV[7], 'segment_size', ARGV[8], 'segment_sha256', ARGV[9],
           'hls_key', ARGV[10], 'hls_size', ARGV[11], 'hls_sha256', ARGV[12])
redis.call('ZREM', leases, member)
running_changed(-1)
log_event('committed')
local done = redis.call('HINCRBY', job, 'chunks_committed', 1)
redis.call('HINCRBY', job, 'frames_committed', ARGV[6])
redis.call('HINCRBY', KEYS[8], 'frames_committed', ARGV[6])
redis.call('HINCRBY', KEYS[8], 'chunks_committed', 1)
redis.call('HSET', job, 'updated_at', now)
if done == tonumber(redis.call('HGET', job, 'chunks_total')) and redis.call('HSETNX', job, 'finalize_enqueued_at', now) == 1 then
  return {'complete'}
end
return {'ok'}
"""

# ARGV[5] reason, [6] max attempts, [7] the token of an attempt whose process is known dead ('': the
# lease must have expired), [8] the retry delay schedule
REQUEUE = PRELUDE + """
local dead = ARGV[7] ~= '' and redis.call('HGET', chunk, 'token') == ARGV[7]
local lease = redis.call('ZSCORE', leases, member)
if lease and tonumber(lease) > tonumber(now) and not dead then return {'skip', 'lease renewed'} end
if redis.call('HGET', chunk, 'state') ~= 'running' then redis.call('ZREM', leases, member) return {'skip', 'not running'} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then return {'skip', 'job is ' .. tostring(js)} end
redis.call('ZREM', leases, member)
local attempt = redis.call('HGET', chunk, 'attempt')
local spent = tonumber(redis.call('HGET', chunk, 'spent') or '0')
local reason = 'attempt ' .. attempt .. ': ' .. ARGV[5]
if spent >= tonumber(ARGV[6]) then fail_chunk(reason .. ' (out of attempts)') return {'failed', reason} end
running_changed(-1)
log_event('requeued', ARGV[5])
local delay = retry_delay(ARGV[8], spent)
redis.call('HSET', chunk, 'state', 'queued', 'reason', reason, 'updated_at', now, 'token', '',
           'not_before', tonumber(now) + delay)
return {'requeued', reason, tostring(spent), tostring(delay)}
"""

# ARGV[5] token, [6] reason, [7] retryable 1/0, [8] max attempts, [9] the retry delay schedule
FAIL = PRELUDE + """
if not owned_by(ARGV[5]) then return {'stale'} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then return {'stopped'} end
redis.call('ZREM', leases, member)
local attempt = redis.call('HGET', chunk, 'attempt')
local spent = tonumber(redis.call('HGET', chunk, 'spent') or '0')
if ARGV[7] == '1' and spent < tonumber(ARGV[8]) then
  running_changed(-1)
  log_event('requeued', ARGV[6])
  local delay = retry_delay(ARGV[9], spent)
  redis.call('HSET', chunk, 'state', 'queued', 'reason', 'attempt ' .. attempt .. ': ' .. ARGV[6],
             'updated_at', now, 'token', '', 'not_before', tonumber(now) + delay)
  return {'requeued', '', tostring(spent), tostring(delay)}
end
fail_chunk(ARGV[6])
return {'failed'}
"""

# ARGV[5] token, [6] reason
RELEASE = PRELUDE + """
if not owned_by(ARGV[5]) then return {'stale'} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then return {'stopped'} end
redis.call('ZREM', leases, member)
running_changed(-1)
log_event('released', ARGV[6])
redis.call('HINCRBY', chunk, 'spent', -1)
redis.call('HSET', chunk, 'state', 'queued', 'reason', ARGV[6], 'updated_at', now, 'token', '')
return {'released'}
"""

# A committed chunk whose segment failed its check (missing, wrong size or hash) goes back to the
# queue with a fresh attempt count, and its job back to rendering; a chunk reopened more than
# ARGV[6] times fails its job (storage that keeps losing segments is not worth retrying forever).
# ARGV[5] reason, [6] max reopenings
REOPEN = PRELUDE + """
if redis.call('HGET', chunk, 'state') ~= 'committed' then return {'skip', 'not committed'} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' and js ~= 'finalizing' then return {'skip', 'job is ' .. tostring(js)} end
local reopened = redis.call('HINCRBY', chunk, 'reopened', 1)
local frames = tonumber(redis.call('HGET', chunk, 'frames_done') or '0')
redis.call('HINCRBY', job, 'chunks_committed', -1)
redis.call('HINCRBY', job, 'frames_committed', -frames)
redis.call('HDEL', job, 'finalize_enqueued_at')
if js == 'finalizing' then
  redis.call('HSET', job, 'state', 'rendering', 'updated_at', now)
  redis.call('ZREM', final_leases, job_id)
end
log_event('reopened', ARGV[5])
redis.call('HSET', chunk, 'state', 'queued', 'spent', 0, 'reason', ARGV[5], 'updated_at', now, 'token', '',
           'frames_done', 0, 'segment_key', '', 'segment_size', '', 'segment_sha256', '')
if reopened > tonumber(ARGV[6]) then
  fail_chunk(ARGV[5] .. ' (' .. reopened .. ' times: storage keeps losing its segment)')
  return {'failed'}
end
return {'requeued'}
"""

# --- the finalizer: a lease with a token, like a chunk attempt --------------------------------------

# ARGV[5] worker, [6] token, [7] lease deadline, [8] worker's process start, [9] the token of a
# finalizer whose process is known dead ('' if none)
TAKE_FINALIZE = PRELUDE + """
local js = redis.call('HGET', job, 'state')
if js == 'rendering' then
  if redis.call('HGET', job, 'chunks_committed') ~= redis.call('HGET', job, 'chunks_total') then
    return {'skip', 'not every chunk is committed'}
  end
elseif js ~= 'finalizing' then
  return {'skip', 'job is ' .. tostring(js)}
end
local lease = redis.call('ZSCORE', final_leases, job_id)
if lease then
  local dead = ARGV[9] ~= '' and redis.call('HGET', job, 'finalizer_token') == ARGV[9]
  if tonumber(lease) > tonumber(now) and not dead then
    return {'skip', 'another finalizer holds the job', redis.call('HGET', job, 'finalizer') or '',
            redis.call('HGET', job, 'finalizer_started') or '', redis.call('HGET', job, 'finalizer_token') or ''}
  end
  event(log, redis.call('HGET', job, 'finalize_attempt'), 'expired',
        dead and 'its worker process died: taken over' or 'lease expired: taken over',
        redis.call('HGET', job, 'finalizer'))
end
local attempt = redis.call('HINCRBY', job, 'finalize_attempt', 1)
redis.call('HSET', job, 'state', 'finalizing', 'updated_at', now, 'finalizer', ARGV[5], 'finalizer_token', ARGV[6],
           'finalizer_started', ARGV[8])
redis.call('ZADD', final_leases, ARGV[7], job_id)
event(log, attempt, 'started', '', ARGV[5])
return {'ok', tostring(attempt)}
"""

# ARGV[5] token, [6] lease deadline
BEAT_FINALIZE = PRELUDE + """
if redis.call('HGET', job, 'state') ~= 'finalizing' or redis.call('HGET', job, 'finalizer_token') ~= ARGV[5] then
  return 'lost'
end
redis.call('ZADD', final_leases, ARGV[6], job_id)
return 'ok'
"""

# ARGV[5] token, [6] output location
FINISH_DONE = PRELUDE + """
local js = redis.call('HGET', job, 'state')
if js ~= 'finalizing' then return {'refused', 'job is ' .. tostring(js)} end
if redis.call('HGET', job, 'finalizer_token') ~= ARGV[5] then return {'stale'} end
redis.call('HINCRBY', KEYS[8], 'jobs_done', 1)
redis.call('HSET', job, 'state', 'done', 'output_location', ARGV[6], 'updated_at', now, 'finished_at', now,
           'reason', '')
redis.call('ZREM', final_leases, job_id)
redis.call('SREM', active, job_id)
redis.call('SADD', unrecorded, job_id)
event(log, redis.call('HGET', job, 'finalize_attempt'), 'done', '', redis.call('HGET', job, 'finalizer'))
return {'ok'}
"""

# A finalizer gives the job up: it found chunks to render again (ARGV[6] = 'reopened') or it is
# shutting down ('released'). ARGV[5] token, [7] reason
RELEASE_FINALIZE = PRELUDE + """
if redis.call('HGET', job, 'finalizer_token') ~= ARGV[5] then return {'stale'} end
redis.call('ZREM', final_leases, job_id)
redis.call('HSET', job, 'finalizer_token', '')
event(log, redis.call('HGET', job, 'finalize_attempt'), ARGV[6], ARGV[7], redis.call('HGET', job, 'finalizer'))
return {'ok'}
"""

# --- job records ---------------------------------------------------------------------------------

# A new job, unless its tenant already has ARGV[2] jobs not yet ended (0: no limit): the count and
# the write are one step, so submissions racing each other cannot pass the limit together.
# KEYS[1] job hash, [2] jobs, [3] active; ARGV[1] job id, [2] limit, [3] tenant, [4] created at,
# [5] the prefix of job hashes, [6...] the record's field/value pairs. {'ok'} or {'full', count}.
CREATE_JOB = """
local limit = tonumber(ARGV[2])
if limit > 0 then
  local count = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local owner = redis.call('HGET', ARGV[5] .. id, 'tenant')
    if (owner or 'default') == ARGV[3] or (owner == '' and ARGV[3] == 'default') then count = count + 1 end
  end
  if count >= limit then return {'full', tostring(count)} end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return {'ok'}
"""

# --- job moves --------------------------------------------------------------------------------------

# A failed or cancelled job goes on: its chunks that are not committed are queued again with a fresh
# attempt count, and it goes back to rendering (or to queued, to be planned, if it never was).
RESUME = PRELUDE + """
local js = redis.call('HGET', job, 'state')
if not js then return {'missing'} end
if js ~= 'failed' and js ~= 'cancelled' then return {'refused', js} end
redis.call('HINCRBY', KEYS[8], 'jobs_' .. js, -1)
redis.call('HSET', job, 'reason', '', 'updated_at', now)
redis.call('HDEL', job, 'finished_at', 'finalize_enqueued_at')
redis.call('SADD', active, job_id)
redis.call('SREM', unrecorded, job_id)
local total = tonumber(redis.call('HGET', job, 'chunks_total') or '0')
if total == 0 then
  redis.call('HSET', job, 'state', 'queued')
  return {'replan'}
end
local queued = {'ok'}
for i = 0, total - 1 do
  local key = chunk_prefix .. i
  if redis.call('HGET', key, 'state') ~= 'committed' then
    redis.call('HSET', key, 'state', 'queued', 'spent', 0, 'token', '', 'reason', 'job resumed', 'updated_at', now)
    table.insert(queued, tostring(i))
  end
end
redis.call('HSET', job, 'state', 'rendering')
return queued
"""

# ARGV[5] target state, [6] states it may come from (comma list), [7] reason, [8...] field/value pairs
JOB_MOVE = PRELUDE + """
local state = redis.call('HGET', job, 'state')
if not state then return {'missing'} end
local ok = false
for s in string.gmatch(ARGV[6], '[^,]+') do if s == state then ok = true end end
if not ok then return {'refused', state} end
local target = ARGV[5]
if target == 'failed' or target == 'cancelled' then
  end_job(target, ARGV[7])
  return {'ok', state}
end
redis.call('HSET', job, 'state', target, 'updated_at', now)
if ARGV[7] ~= '' then redis.call('HSET', job, 'reason', ARGV[7]) end
for i = 8, #ARGV, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
return {'ok', state}
"""


# --- farm-wide figures: histograms observed where things happen, exported by the API ------------------
# A histogram is a hash: one field per bucket bound (as the caller spells it; '+Inf' past the last)
# counting the observations that fell in that bucket alone, plus 'count' and 'sum'. The exporter
# makes the buckets cumulative. ARGV[first..] are the bucket bounds, ascending.

OBSERVE_FN = """
local function observe(hist, value, first)
  local field = '+Inf'
  for i = first, #ARGV do
    if value <= tonumber(ARGV[i]) then field = ARGV[i] break end
  end
  redis.call('HINCRBY', hist, field, 1)
  redis.call('HINCRBY', hist, 'count', 1)
  redis.call('HINCRBYFLOAT', hist, 'sum', value)
end
"""

# KEYS[1] histogram; ARGV[1] value, [2...] bounds
OBSERVE = OBSERVE_FN + """
observe(KEYS[1], tonumber(ARGV[1]), 2)
return 1
"""

# The job's first commit, marked once (HSETNX), and its delay since submission observed once.
# KEYS[1] job hash, [2] histogram; ARGV[1] now, [2...] bounds. Returns the delay, or nil.
FIRST_COMMIT = OBSERVE_FN + """
local created = redis.call('HGET', KEYS[1], 'created_at')
if not created then return false end
if redis.call('HSETNX', KEYS[1], 'first_committed_at', ARGV[1]) == 0 then return false end
local delay = math.max(0, tonumber(ARGV[1]) - tonumber(created))
observe(KEYS[2], delay, 2)
return tostring(delay)
"""

# --- webhooks: one event per job end, delivered at least once (common.webhooks) -------------------------
# The hash holds the job's latest event (a resumed job that ends again replaces it) and how its
# delivery goes: state pending -> delivered | failed (given up), 'attempts' made, 'sending' (the
# attempt being sent, 0 if none, with 'sending_at'), the last answer. KEYS[1] hash, [2] attempt log,
# [3] the due set: a pending event's job, scored by when its next attempt should have begun (so a
# delivery message the broker lost is found and sent again by the recovery pass).

# ARGV[1] event id, [2] type, [3] url, [4] now, [5] job id. Returns when it was queued ('' if not yet).
WEBHOOK_OPEN = """
if redis.call('HGET', KEYS[1], 'event_id') == ARGV[1] then
  return redis.call('HGET', KEYS[1], 'queued_at') or ''
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'event_id', ARGV[1], 'type', ARGV[2], 'url', ARGV[3], 'state', 'pending',
           'created_at', ARGV[4], 'attempts', 0, 'sending', 0)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
return ''
"""

# An attempt may start once: a duplicate message finds it made (skip) or being made (busy: look again
# later; a sender silent for ARGV[4] seconds is taken to have died, and its attempt is made again).
# ARGV[1] event id, [2] attempt, [3] now, [4] stale after (s), [5] job id
WEBHOOK_BEGIN = """
if redis.call('HGET', KEYS[1], 'event_id') ~= ARGV[1] then return {'skip', 'superseded by a later event'} end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'pending' then return {'skip', 'already ' .. tostring(state)} end
local attempt = tonumber(ARGV[2])
if attempt <= tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') then
  return {'skip', 'attempt ' .. attempt .. ' was made'}
end
local sending = tonumber(redis.call('HGET', KEYS[1], 'sending') or '0')
local since = tonumber(redis.call('HGET', KEYS[1], 'sending_at') or '0')
if sending > 0 and tonumber(ARGV[3]) - since < tonumber(ARGV[4]) then
  return {'busy', 'attempt ' .. sending .. ' is being sent'}
end
redis.call('HSET', KEYS[1], 'sending', attempt, 'sending_at', ARGV[3])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[5])
return {'ok', ''}
"""

# ARGV[1] event id, [2] attempt, [3] now, [4] outcome (delivered, retry, failed), [5] HTTP status
# (0: no answer), [6] error, [7] seconds it took, [8] when the next attempt goes ('' if none), [9] job id
WEBHOOK_END = """
if redis.call('HGET', KEYS[1], 'event_id') ~= ARGV[1] then return 'skip' end
redis.call('RPUSH', KEYS[2], cjson.encode({attempt = tonumber(ARGV[2]), at = tonumber(ARGV[3]),
  status = tonumber(ARGV[5]), error = ARGV[6], duration_s = tonumber(ARGV[7]), outcome = ARGV[4]}))
local made = math.max(tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0'), tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'attempts', made, 'sending', 0, 'last_at', ARGV[3], 'last_status', ARGV[5],
           'last_error', ARGV[6])
if redis.call('HGET', KEYS[1], 'state') == 'pending' then
  if ARGV[4] == 'delivered' then
    redis.call('HSET', KEYS[1], 'state', 'delivered', 'delivered_at', ARGV[3], 'next_at', '')
    redis.call('ZREM', KEYS[3], ARGV[9])
  elseif ARGV[4] == 'failed' then
    redis.call('HSET', KEYS[1], 'state', 'failed', 'next_at', '')
    redis.call('ZREM', KEYS[3], ARGV[9])
  else
    redis.call('HSET', KEYS[1], 'next_at', ARGV[8])
    redis.call('ZADD', KEYS[3], ARGV[8], ARGV[9])
  end
end
return 'ok'
"""

# An ended job whose end is recorded in storage leaves Redis, all its keys at once, if it still
# qualifies when the script runs (a resume or a pending webhook in between keeps it).
# KEYS[1] job, [2] jobs, [3] active, [4] unrecorded, [5] webhook, [6] webhook attempts, [7] webhooks due,
# [8] playlist lock, [9] playlist dirty. ARGV[1] job id, [2] ended before, [3] chunk key prefix,
# [4] attempt log prefix. Returns 1 if it was removed.
FORGET = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'done' and state ~= 'failed' and state ~= 'cancelled' then return 0 end
local finished = tonumber(redis.call('HGET', KEYS[1], 'finished_at') or '')
if not finished or finished >= tonumber(ARGV[2]) then return 0 end
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return 0 end
if redis.call('HGET', KEYS[5], 'state') == 'pending' then return 0 end
local n = tonumber(redis.call('HGET', KEYS[1], 'chunks_total') or '0')
for i = 0, n - 1 do redis.call('DEL', ARGV[3] .. i, ARGV[4] .. i) end
redis.call('DEL', ARGV[4] .. 'finalize', KEYS[1], KEYS[5], KEYS[6], KEYS[8], KEYS[9])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('HINCRBY', KEYS[10], 'jobs_' .. state, -1)
return 1
"""
