"""The Lua scripts behind every chunk move and job move, each one atomic step with its checks.

Redis runs a script without interleaving other commands, so a check ("does this token still own the
chunk?") and the write it guards cannot be separated by another client. ``common.state.store``
calls them; nothing else does. Field names are those of ``common.state.records``.
"""

# Every chunk script: KEYS = chunk, job, leases, active, attempt log;
# ARGV[1] = job id, ARGV[2] = chunk index, ARGV[3] = now.
#
# A chunk's ``attempt`` numbers its attempts (1, 2, ...; never reused) and ``spent`` counts those
# charged against the attempt limit (a worker shutting down hands its charge back). Each attempt's
# start and end go to the chunk's attempt log, a list of JSON events: what tests and ``status``
# read to know who rendered what, when, and how each attempt ended.
PRELUDE = """
local chunk, job, leases, active, log = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job_id, index, now = ARGV[1], ARGV[2], ARGV[3]
local member = job_id .. ':' .. index
local function log_event(event, reason, worker)
  local attempt = tonumber(redis.call('HGET', chunk, 'attempt') or '0')
  redis.call('RPUSH', log, cjson.encode({attempt = attempt, event = event, at = tonumber(now),
    worker = worker or redis.call('HGET', chunk, 'worker') or '', reason = reason or ''}))
end
local function fail_job(reason)
  local js = redis.call('HGET', job, 'state')
  if js == 'done' or js == 'failed' or js == 'cancelled' then return end
  redis.call('HSET', job, 'state', 'failed', 'reason', reason, 'updated_at', now, 'finished_at', now)
  redis.call('SREM', active, job_id)
end
local function fail_chunk(reason)
  if redis.call('HGET', chunk, 'state') == 'running' then log_event('failed', reason) end
  redis.call('HSET', chunk, 'state', 'failed', 'reason', reason, 'updated_at', now, 'token', '')
  redis.call('ZREM', leases, member)
  fail_job('chunk ' .. index .. ' failed: ' .. reason)
end
local function stop_chunk(reason)
  if redis.call('HGET', chunk, 'state') == 'running' then log_event('stopped', reason) end
  redis.call('HSET', chunk, 'state', 'cancelled', 'reason', reason, 'updated_at', now, 'token', '')
  redis.call('ZREM', leases, member)
end
local function owned_by(token)
  return redis.call('HGET', chunk, 'state') == 'running' and redis.call('HGET', chunk, 'token') == token
end
"""

# ARGV[4] worker, [5] token, [6] lease deadline, [7] max attempts
CLAIM = PRELUDE + """
local js = redis.call('HGET', job, 'state')
local state = redis.call('HGET', chunk, 'state')
if not state then return {'skip', 'no such chunk'} end
if js ~= 'rendering' then
  if state == 'queued' and (js == 'cancelled' or js == 'failed') then stop_chunk('job ' .. js) end
  return {'skip', 'job is ' .. tostring(js)}
end
if state == 'running' then
  local lease = tonumber(redis.call('ZSCORE', leases, member) or '0')
  if lease > tonumber(now) then return {'skip', 'running in another attempt'} end
  log_event('expired', 'lease expired: taken over')
  redis.call('HSET', chunk, 'state', 'queued')  -- the dead attempt is over; this claim starts the next
elseif state ~= 'queued' then
  return {'skip', 'chunk is ' .. state}
end
local spent = tonumber(redis.call('HGET', chunk, 'spent') or '0')
local max_attempts = tonumber(ARGV[7])
if spent >= max_attempts then
  local last = redis.call('HGET', chunk, 'reason') or ''
  fail_chunk('out of attempts (' .. spent .. ' of ' .. max_attempts .. '); last: ' .. last)
  return {'failed', 'out of attempts'}
end
local attempt = tonumber(redis.call('HGET', chunk, 'attempt') or '0') + 1
redis.call('HSET', chunk, 'state', 'running', 'attempt', attempt, 'spent', spent + 1, 'token', ARGV[5],
           'worker', ARGV[4], 'started_at', now, 'updated_at', now, 'beat_at', now, 'frames_done', 0)
log_event('started', '', ARGV[4])
redis.call('ZADD', leases, ARGV[6], member)
if not redis.call('HGET', job, 'rendering_at') then redis.call('HSET', job, 'rendering_at', now) end
return {'ok', tostring(attempt)}
"""

# ARGV[4] token, [5] lease deadline, [6] frames done, [7] peak rss bytes
BEAT = PRELUDE + """
if not owned_by(ARGV[4]) then return 'lost' end
if redis.call('HGET', job, 'state') ~= 'rendering' then return 'stopped' end
redis.call('ZADD', leases, ARGV[5], member)
redis.call('HSET', chunk, 'frames_done', ARGV[6], 'beat_at', now, 'peak_rss', ARGV[7])
return 'ok'
"""

# ARGV[4] token, [5] frames
COMMIT = PRELUDE + """
local state = redis.call('HGET', chunk, 'state')
if state == 'committed' then return {'duplicate'} end
if not owned_by(ARGV[4]) then return {'stale', tostring(state)} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then stop_chunk('job ' .. tostring(js)) return {'refused', 'job is ' .. tostring(js)} end
redis.call('HSET', chunk, 'state', 'committed', 'committed_at', now, 'updated_at', now,
           'frames_done', ARGV[5], 'reason', '', 'token', '')
log_event('committed')
redis.call('ZREM', leases, member)
local done = redis.call('HINCRBY', job, 'chunks_committed', 1)
redis.call('HINCRBY', job, 'frames_committed', ARGV[5])
redis.call('HSET', job, 'updated_at', now)
if done == tonumber(redis.call('HGET', job, 'chunks_total')) and redis.call('HSETNX', job, 'finalize_enqueued_at', now) == 1 then
  return {'complete'}
end
return {'ok'}
"""

# ARGV[4] reason, [5] max attempts
REQUEUE = PRELUDE + """
local lease = redis.call('ZSCORE', leases, member)
if lease and tonumber(lease) > tonumber(now) then return {'skip', 'lease renewed'} end
redis.call('ZREM', leases, member)
if redis.call('HGET', chunk, 'state') ~= 'running' then return {'skip', 'not running'} end
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then stop_chunk('job ' .. tostring(js)) return {'skip', 'job is ' .. tostring(js)} end
local attempt = tonumber(redis.call('HGET', chunk, 'attempt') or '0')
local spent = tonumber(redis.call('HGET', chunk, 'spent') or '0')
local reason = 'attempt ' .. attempt .. ': ' .. ARGV[4]
if spent >= tonumber(ARGV[5]) then fail_chunk(reason .. ' (out of attempts)') return {'failed', reason} end
log_event('requeued', ARGV[4])
redis.call('HSET', chunk, 'state', 'queued', 'reason', reason, 'updated_at', now, 'token', '')
return {'requeued', reason}
"""

# ARGV[4] token, [5] reason, [6] retryable 1/0, [7] max attempts
FAIL = PRELUDE + """
if not owned_by(ARGV[4]) then return {'stale'} end
redis.call('ZREM', leases, member)
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then stop_chunk('job ' .. tostring(js)) return {'stopped'} end
local attempt = tonumber(redis.call('HGET', chunk, 'attempt') or '0')
local spent = tonumber(redis.call('HGET', chunk, 'spent') or '0')
local reason = 'attempt ' .. attempt .. ': ' .. ARGV[5]
if ARGV[6] == '1' and spent < tonumber(ARGV[7]) then
  log_event('requeued', ARGV[5])
  redis.call('HSET', chunk, 'state', 'queued', 'reason', reason, 'updated_at', now, 'token', '')
  return {'requeued'}
end
fail_chunk(ARGV[5])
return {'failed'}
"""

# ARGV[4] token, [5] reason
RELEASE = PRELUDE + """
if not owned_by(ARGV[4]) then return {'stale'} end
redis.call('ZREM', leases, member)
local js = redis.call('HGET', job, 'state')
if js ~= 'rendering' then stop_chunk('job ' .. tostring(js)) return {'stopped'} end
log_event('released', ARGV[5])
redis.call('HINCRBY', chunk, 'spent', -1)
redis.call('HSET', chunk, 'state', 'queued', 'reason', ARGV[5], 'updated_at', now, 'token', '')
return {'released'}
"""

# KEYS = job, active; ARGV = job id, now, target state, allowed from (comma list), reason, extra k/v...
JOB_MOVE = """
local job, active = KEYS[1], KEYS[2]
local state = redis.call('HGET', job, 'state')
if not state then return {'missing'} end
local ok = false
for s in string.gmatch(ARGV[4], '[^,]+') do if s == state then ok = true end end
if not ok then return {'refused', state} end
redis.call('HSET', job, 'state', ARGV[3], 'updated_at', ARGV[2])
if ARGV[5] ~= '' then redis.call('HSET', job, 'reason', ARGV[5]) end
for i = 6, #ARGV, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
if ARGV[3] == 'done' or ARGV[3] == 'failed' or ARGV[3] == 'cancelled' then
  redis.call('HSET', job, 'finished_at', ARGV[2])
  redis.call('SREM', active, ARGV[1])
end
return {'ok', state}
"""
