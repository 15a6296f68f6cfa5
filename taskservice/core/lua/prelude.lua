-- Shared by every script (taskservice/core/scripts.py runs it first): the
-- deployment's key names, the states, and what each transition does. ARGV[1]
-- is the key prefix and ARGV[2] the record TTL (seconds) in every script.
-- A script uses some of these and not others: luacheck is told not to report
-- the ones a script leaves unused.
-- luacheck: push ignore 211
local PREFIX = ARGV[1]
local TTL = tonumber(ARGV[2])
local LEASES = PREFIX .. ':leases'
local CHANNEL = PREFIX .. ':events'
local ACTIVE = {PENDING = true, STARTED = true}
local TERMINAL = {SUCCESS = true, FAILURE = true, REVOKED = true, LOST = true}
local RANK = {GRACEFUL = 1, TERMINATE = 2, KILL = 3}
local LOG_LENGTH = 64

local INDEX = PREFIX .. ':index'
local ACTIVE_INDEX = INDEX .. ':active'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function seconds(ms) return string.format('%.3f', ms / 1000) end

local function task_key(id) return PREFIX .. ':task:{' .. id .. '}' end

local function snapshot(rkey)
  local flat = redis.call('HGETALL', rkey)
  local rec = {}
  for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
  return cjson.encode(rec), rec
end

-- A change: bump the sequence, keep the record for TTL from now, append it
-- to the task's log (so a watch can resume; a terminal change need not be:
-- it stays the record itself) and tell watchers.
local function commit(rkey, terminal)
  redis.call('HINCRBY', rkey, 'seq', 1)
  redis.call('EXPIRE', rkey, TTL)
  local payload, rec = snapshot(rkey)
  if not terminal then
    local log = PREFIX .. ':log:{' .. rec['id'] .. '}'
    redis.call('RPUSH', log, payload)
    redis.call('LTRIM', log, -LOG_LENGTH, -1)
    redis.call('EXPIRE', log, TTL)
  end
  redis.call('PUBLISH', CHANNEL, rec['id'] .. ' ' .. payload)
  return payload
end

-- No lease means nobody has to prove liveness (waiting in the broker): never lapsed.
local function lapsed(id, now)
  local deadline = redis.call('ZSCORE', LEASES, id)
  return deadline ~= false and tonumber(deadline) <= now
end

-- End an active task. A task whose cancel was requested ends REVOKED,
-- whatever else ended it: the caller asked for it to stop.
local function finish(rkey, id, state, fields)
  if state ~= 'REVOKED' and redis.call('HEXISTS', rkey, 'cancel') == 1 then
    state = 'REVOKED'
  end
  redis.call('HSET', rkey, 'state', state, unpack(fields))
  redis.call('HDEL', rkey, 'publishing')
  redis.call('ZREM', LEASES, id)
  redis.call('ZREM', ACTIVE_INDEX, id)
  return commit(rkey, true)
end

-- List a new task, newest first by its creation (ms), in the indexes
-- ListTasks pages through: all tasks, the active ones, per type, per key.
-- Entries older than twice the record TTL are trimmed as new ones come (a
-- record lives TTL after its last change); an entry whose record expired
-- sooner is dropped when a listing meets it.
local function index(id, now, name, key)
  local old = now - 2000 * TTL
  local lists = {INDEX, ACTIVE_INDEX, INDEX .. ':name:' .. name}
  if key then lists[4] = INDEX .. ':key:' .. key end
  for _, list in ipairs(lists) do
    redis.call('ZADD', list, now, id)
    redis.call('ZREMRANGEBYSCORE', list, '-inf', old)
    redis.call('EXPIRE', list, 2 * TTL)
  end
end

-- A Start whose message never reached the broker: give the exclusivity key
-- back to the task that held it before (compare-and-set: only if this task
-- still holds it), and end the task so that a message that got through
-- after all is refused by the worker.
local function abandon(rkey, id, now, message)
  local req = redis.call('HGET', rkey, 'request')
  if req and redis.call('HGET', req, 'task') == id then
    redis.call('DEL', req)  -- a retry of this Start must run anew
  end
  local key = redis.call('HGET', rkey, 'key')
  if key then
    local hkey = PREFIX .. ':key:{' .. key .. '}'
    if redis.call('GET', hkey) == id then
      local prev = redis.call('HGET', rkey, 'prev')
      if prev then redis.call('SET', hkey, prev, 'KEEPTTL') else redis.call('DEL', hkey) end
    end
  end
  return finish(rkey, id, 'REVOKED', {'finished', seconds(now),
    'error_type', 'NotEnqueued', 'error_message', message})
end

-- End a task whose lease lapsed.
local function expire(rkey, id, state, now)
  if redis.call('HEXISTS', rkey, 'publishing') == 1 then
    return abandon(rkey, id, now,
      'never enqueued: the server that accepted it stopped before confirming '
      .. 'the broker had it; it will not run')
  end
  local worker = redis.call('HGET', rkey, 'worker')
  local why = 'its worker stopped heartbeating'
  if worker then why = 'its worker ' .. worker .. ' stopped heartbeating' end
  if state == 'PENDING' then why = why .. ' before starting it; it will not run' end
  return finish(rkey, id, 'LOST', {'finished', seconds(now),
    'error_type', 'WorkerLostError', 'error_message', why})
end

-- The record's state, after ending it if its lease lapsed; false if missing.
local function current(rkey, id, now)
  local state = redis.call('HGET', rkey, 'state')
  if state and ACTIVE[state] and lapsed(id, now) then
    expire(rkey, id, state, now)
    state = redis.call('HGET', rkey, 'state')
  end
  return state
end
-- luacheck: pop
