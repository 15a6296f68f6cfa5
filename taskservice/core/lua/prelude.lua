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
local DUE = PREFIX .. ':due'
local STATS = PREFIX .. ':stats'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function seconds(ms) return string.format('%.3f', ms / 1000) end

local function task_key(id) return PREFIX .. ':task:{' .. id .. '}' end

-- A per-exclusivity-key structure: 'key' (the latest holder's id), 'fence',
-- 'holders' (ZSET id -> claim ms), 'line' (LIST of waiting ids), 'quiet'.
local function key_part(kind, key) return PREFIX .. ':' .. kind .. ':{' .. key .. '}' end

-- How a deferred task (waiting for its key or its time) reaches the broker:
-- 'list' + 'message' (pushed by a script) or 'delivery' (a server publishes).
local function send_key(id) return PREFIX .. ':send:{' .. id .. '}' end

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

-- Ask a running task to stop: record the strongest cancel mode asked for so
-- far (a later ask escalates, never softens). -> the record JSON and the mode
-- now recorded.
local function ask_to_stop(rkey, mode)
  local asked = redis.call('HGET', rkey, 'cancel')
  if not asked or RANK[mode] > (RANK[asked] or 0) then
    redis.call('HSET', rkey, 'cancel', mode)
    return commit(rkey), mode
  end
  return (snapshot(rkey)), asked
end

-- The ids of the key's unfinished holders (dropping ended ones), oldest
-- claim first. A holder claimed before keys had slots (only the 'key'
-- string names it) counts too.
local function holders(key)
  local hz = key_part('holders', key)
  local live = {}
  for _, hid in ipairs(redis.call('ZRANGE', hz, 0, -1)) do
    if ACTIVE[redis.call('HGET', task_key(hid), 'state') or ''] then
      live[#live + 1] = hid
    else
      redis.call('ZREM', hz, hid)
    end
  end
  local latest = redis.call('GET', key_part('key', key))
  if latest and not redis.call('ZSCORE', hz, latest)
      and ACTIVE[redis.call('HGET', task_key(latest), 'state') or '']
      and not redis.call('HGET', task_key(latest), 'waiting_for') then
    table.insert(live, 1, latest)
  end
  return live
end

-- Make task `id` a holder of `key`, with a fencing token above every token
-- issued under the key before, even once the counter expired or lost its
-- last write to a failover, as Redis's clock (ms) is its floor. `keep`: how
-- long (s) the key's structures must outlive this (a task due later).
local function take_slot(key, id, rkey, now, keep)
  local fkey = key_part('fence', key)
  local token = string.format('%.0f', math.max(tonumber(redis.call('GET', fkey) or 0) + 1, now))
  redis.call('SET', fkey, token, 'EX', keep)
  redis.call('HSET', rkey, 'fence', token)
  local hz = key_part('holders', key)
  redis.call('ZADD', hz, now, id)
  if redis.call('TTL', hz) < keep then redis.call('EXPIRE', hz, keep) end
  redis.call('SET', key_part('key', key), id, 'EX', keep)
  return token
end

-- Send a deferred task on its way, now that it may run: at its time (the
-- due set, read by every server's dispatcher) or now, pushed here when the
-- message could be built ahead, else published by a server (due now).
local function dispatch(id, rkey, now)
  local due = tonumber(redis.call('HGET', rkey, 'due') or '0')
  if due > now then
    redis.call('ZADD', DUE, due, id)
    return
  end
  local skey = send_key(id)
  local send = redis.call('HMGET', skey, 'list', 'message')
  if send[1] then
    redis.call('LPUSH', send[1], send[2])
    redis.call('DEL', skey)
    redis.call('ZREM', DUE, id)
  else
    redis.call('ZADD', DUE, now, id)
  end
end

-- A slot of `key` may have freed: the tasks at the head of its line take
-- the free slots (each as many as its own type allows), in order.
local function promote(key, now)
  local line = key_part('line', key)
  while true do
    local head = redis.call('LINDEX', line, 0)
    if not head then return end
    local hkey = task_key(head)
    local r = redis.call('HMGET', hkey, 'state', 'waiting_for', 'slots', 'due')
    if r[1] ~= 'PENDING' or not r[2] then
      redis.call('LPOP', line)  -- ended (or expired) while it waited
    else
      if #holders(key) >= (tonumber(r[3]) or 1) then return end
      redis.call('LPOP', line)
      redis.call('HDEL', hkey, 'waiting_for')
      local keep = TTL + math.max(0, math.ceil(((tonumber(r[4]) or 0) - now) / 1000))
      take_slot(key, head, hkey, now, keep)
      redis.call('HINCRBY', STATS, 'handovers', 1)
      dispatch(head, hkey, now)
      commit(hkey)
    end
  end
end

-- End an active task. A task whose cancel was requested ends REVOKED,
-- whatever else ended it: the caller asked for it to stop. A task that held
-- a slot of its exclusivity key hands it to the key's line in this same
-- step (after its quiet period starts, if its type has one); a task that
-- waited for the key leaves the line.
local function finish(rkey, id, state, fields)
  if state ~= 'REVOKED' and redis.call('HEXISTS', rkey, 'cancel') == 1 then
    state = 'REVOKED'
  end
  local r = redis.call('HMGET', rkey, 'key', 'waiting_for', 'quiet', 'quiet_after', 'started')
  redis.call('HSET', rkey, 'state', state, unpack(fields))
  redis.call('HDEL', rkey, 'publishing', 'waiting_for')
  redis.call('ZREM', LEASES, id)
  redis.call('ZREM', ACTIVE_INDEX, id)
  redis.call('ZREM', DUE, id)
  redis.call('DEL', send_key(id))
  local payload = commit(rkey, true)
  local key = r[1]
  if key and r[2] then
    redis.call('LREM', key_part('line', key), 0, id)
    -- The next in line may fit a free slot its predecessor did not.
    promote(key, now_ms())
  elseif key then
    redis.call('ZREM', key_part('holders', key), id)
    -- A quiet period follows a run (a task that never started leaves none).
    if r[3] and r[5] and (r[4] ~= 'SUCCESS' or state == 'SUCCESS') then
      redis.call('SET', key_part('quiet', key), id, 'PX', r[3])
    end
    promote(key, now_ms())
  end
  return payload
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
    local hkey = key_part('key', key)
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
