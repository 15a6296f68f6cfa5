-- KEYS[1] the new record; with an exclusivity key also KEYS[2] its holder
-- and KEYS[3] its fencing counter.
-- ARGV[3] task id, ARGV[4] provisional lease (ms), ARGV[5] request key ('' for
-- none), ARGV[6] request fingerprint, ARGV[7] request TTL, ARGV[8] broker list
-- to push the task's message on ('' when a server publishes it, then under a
-- provisional lease if it is sent now), ARGV[9] the message, ARGV[10] the
-- conflict policy, ARGV[11] the key's slots, ARGV[12] the longest line,
-- ARGV[13] REPLACE's cancel mode, ARGV[14] the delivery a server publishes
-- if the task is deferred and ARGV[8] is '', ARGV[15] how long (ms) until
-- it may run ('' at once), ARGV[16] the exclusivity key ('' none),
-- ARGV[17..] fields.
-- -> {'ok', fencing token ('' without a key)}: the key is the task's; the
--      message went with the claim (ARGV[8]) or the caller publishes it now
--  | {'deferred', token, waiting for, superseded ids (','), running task to
--      revoke, its cancel mode[, record JSON if it changed since accepted]}:
--      accepted, and the scripts and dispatchers send it when it may run (its
--      time, or its turn for the key)
--  | {'held', holder record JSON} | {'quiet', last task JSON ('' if expired),
--      ms until the key frees} | {'full', line limit}
--  | {'repeat', task id of the earlier Start with this request id}
--  | {'reused', ''} (other parameters)
local now = now_ms()
local id = ARGV[3]
local key = ARGV[16]
local due = 0
if ARGV[15] ~= '' then due = now + tonumber(ARGV[15]) end
-- Deferred tasks are kept until TTL past their time.
local keep = TTL + math.max(0, math.ceil((due - now) / 1000))

-- The record exists: this claim was sent again (a retry after a lost reply).
if redis.call('EXISTS', KEYS[1]) == 1 then
  local r = redis.call('HMGET', KEYS[1], 'fence', 'waiting_for', 'due')
  if r[2] or r[3] then return {'deferred', r[1] or '', r[2] or '', '', '', ''} end
  return {'ok', r[1] or ''}
end
local req = ARGV[5]
if req ~= '' then
  local seen = redis.call('HMGET', req, 'fingerprint', 'task')
  if seen[1] then
    if seen[1] ~= ARGV[6] then return {'reused', ''} end
    return {'repeat', seen[2]}
  end
end

local function accept(waiting_for)
  redis.call('HSET', KEYS[1], unpack(ARGV, 17))
  if waiting_for then redis.call('HSET', KEYS[1], 'waiting_for', waiting_for) end
  if due > 0 then redis.call('HSET', KEYS[1], 'due', string.format('%.0f', due)) end
  redis.call('EXPIRE', KEYS[1], keep)
  index(id, now, redis.call('HGET', KEYS[1], 'name'), key ~= '' and key or nil)
  if req ~= '' then
    redis.call('HSET', KEYS[1], 'request', req)
    redis.call('HSET', req, 'fingerprint', ARGV[6], 'task', id)
    redis.call('EXPIRE', req, tonumber(ARGV[7]))
  end
  if waiting_for or due > now then
    local skey = send_key(id)
    if ARGV[8] ~= '' then
      redis.call('HSET', skey, 'list', ARGV[8], 'message', ARGV[9])
    else
      redis.call('HSET', skey, 'delivery', ARGV[14])
    end
    redis.call('EXPIRE', skey, keep)
  end
end

-- Send a task that may run now: with its claim, or by the caller.
local function send()
  if due > now then
    redis.call('ZADD', DUE, due, id)
    return 'deferred'
  end
  if ARGV[8] ~= '' then
    redis.call('LPUSH', ARGV[8], ARGV[9])  -- enqueued with its claim
  else
    redis.call('HSET', KEYS[1], 'publishing', '1')
    redis.call('ZADD', LEASES, now + tonumber(ARGV[4]), id)
  end
  return 'ok'
end

if key == '' then
  accept(false)
  return {send(), ''}
end

local quiet = redis.call('GET', key_part('quiet', key))
if quiet then
  local left = redis.call('PTTL', key_part('quiet', key))
  local last = ''
  if redis.call('EXISTS', task_key(quiet)) == 1 then last = snapshot(task_key(quiet)) end
  return {'quiet', last, tostring(left)}
end

-- Holders whose lease lapsed end now: their end hands their slot over first.
for _, hid in ipairs(redis.call('ZRANGE', key_part('holders', key), 0, -1)) do
  current(task_key(hid), hid, now)
end
local latest = redis.call('GET', KEYS[2])
if latest then current(task_key(latest), latest, now) end

local slots = tonumber(ARGV[11])
local policy = ARGV[10]
local line = key_part('line', key)
local live = holders(key)
local waiting = redis.call('LLEN', line)

local function claim()
  accept(false)
  if latest then redis.call('HSET', KEYS[1], 'prev', latest) end
  local token = take_slot(key, id, KEYS[1], now, keep)
  return {send(), token}
end

if #live < slots and waiting == 0 then return claim() end

-- Accept the task into the key's line, waiting for `ahead` to end.
local function join_line(ahead)
  accept(ahead)
  redis.call('RPUSH', line, id)
  redis.call('EXPIRE', line, keep)
  redis.call('HINCRBY', STATS, 'waits', 1)
end

-- The task a refused Start names: the latest holder, else the last in line.
local newest = live[#live] or redis.call('LINDEX', line, -1)
for _, hid in ipairs(live) do
  if hid == latest then newest = latest end
end
if policy == 'REJECT' or policy == 'RETURN_EXISTING' then
  return {'held', (snapshot(task_key(newest)))}
end

if policy == 'QUEUE' then
  local limit = tonumber(ARGV[12])
  if waiting >= limit then return {'full', tostring(limit)} end
  local ahead = redis.call('LINDEX', line, -1) or newest
  join_line(ahead)
  -- A slot may be free that the head of the line could not take (its type
  -- allows fewer): the line moves as far as it can now.
  promote(key, now)
  local r = redis.call('HMGET', KEYS[1], 'fence', 'waiting_for')
  if not r[2] then return {'deferred', r[1] or '', '', '', '', '', (snapshot(KEYS[1]))} end
  return {'deferred', '', ahead, '', '', ''}
end

-- QUEUE_LATEST and REPLACE: the newest Start wins over every waiting one.
-- The line is emptied first, so that no task it held moves up as another
-- one ends here.
local superseded = {}
local waited = redis.call('LRANGE', line, 0, -1)
redis.call('DEL', line)
for _, wid in ipairs(waited) do
  local wkey = task_key(wid)
  if redis.call('HGET', wkey, 'state') == 'PENDING' then
    finish(wkey, wid, 'REVOKED', {'finished', seconds(now), 'error_type', 'Superseded',
      'error_message', 'superseded by task ' .. id .. ', started later under exclusivity key '
      .. key .. '; it never ran'})
    superseded[#superseded + 1] = wid
  end
end
if #superseded > 0 then redis.call('HINCRBY', STATS, 'superseded', #superseded) end
local gone = table.concat(superseded, ',')
live = holders(key)
if #live < slots then
  local claimed = claim()
  return {claimed[1], claimed[2], '', gone, '', ''}
end

if policy == 'QUEUE_LATEST' then
  join_line(newest)
  return {'deferred', '', newest, gone, '', ''}
end

-- REPLACE: wait for the oldest holder, and cancel it.
local victim = live[1]
local vkey = task_key(victim)
join_line(victim)
local mode = ARGV[13]
if redis.call('HGET', vkey, 'state') == 'PENDING' then
  -- Queued: it ends now, and its slot goes to this task in the same step.
  finish(vkey, victim, 'REVOKED', {'cancel', mode, 'finished', seconds(now),
    'error_type', 'Replaced', 'error_message', 'replaced by task ' .. id
    .. ' (CONFLICT_POLICY_REPLACE) before it ran'})
  local r = redis.call('HMGET', KEYS[1], 'fence', 'waiting_for')
  return {'deferred', r[1] or '', r[2] or '', gone, '', '', (snapshot(KEYS[1]))}
end
local _, asked = ask_to_stop(vkey, mode)
return {'deferred', '', victim, gone, victim, asked}
