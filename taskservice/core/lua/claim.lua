-- KEYS[1] the new record, KEYS[2] the key's holder and KEYS[3] its fencing
-- counter (only with a key).
-- ARGV[3] task id, ARGV[4] provisional lease (ms), ARGV[5] request key ('' for
-- none), ARGV[6] request fingerprint, ARGV[7] request TTL, ARGV[8] broker list
-- to push the task's message on ('' when the server publishes it itself, then
-- under a provisional lease), ARGV[9] the message, ARGV[10..] fields.
-- -> {'ok', fencing token ('' without a key)} | {'held', holder record JSON}
-- | {'repeat', task id of the earlier Start with this request id}
-- | {'reused', ''} (other parameters)
local now = now_ms()
local id = ARGV[3]
-- The record exists: this claim was sent again (a retry after a lost reply).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'ok', redis.call('HGET', KEYS[1], 'fence') or ''}
end
local req = ARGV[5]
if req ~= '' then
  local seen = redis.call('HMGET', req, 'fingerprint', 'task')
  if seen[1] then
    if seen[1] ~= ARGV[6] then return {'reused', ''} end
    return {'repeat', seen[2]}
  end
end
local prev = false
local token = ''
if KEYS[2] then
  prev = redis.call('GET', KEYS[2])
  if prev then
    local pkey = task_key(prev)
    local state = current(pkey, prev, now)
    if state and ACTIVE[state] then return {'held', (snapshot(pkey))} end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 10))
if prev then redis.call('HSET', KEYS[1], 'prev', prev) end
if KEYS[2] then
  -- The fencing token: above every token issued under this key before, even
  -- once the counter expired or lost its last write to a failover, as
  -- Redis's clock (ms) is its floor.
  token = string.format('%.0f', math.max(tonumber(redis.call('GET', KEYS[3]) or 0) + 1, now))
  redis.call('SET', KEYS[3], token, 'EX', TTL)
  redis.call('HSET', KEYS[1], 'fence', token)
end
redis.call('EXPIRE', KEYS[1], TTL)
if KEYS[2] then redis.call('SET', KEYS[2], id, 'EX', TTL) end
index(id, now, redis.call('HGET', KEYS[1], 'name'), redis.call('HGET', KEYS[1], 'key'))
if req ~= '' then
  redis.call('HSET', KEYS[1], 'request', req)
  redis.call('HSET', req, 'fingerprint', ARGV[6], 'task', id)
  redis.call('EXPIRE', req, tonumber(ARGV[7]))
end
if ARGV[8] ~= '' then
  redis.call('LPUSH', ARGV[8], ARGV[9])  -- enqueued with its claim
else
  redis.call('HSET', KEYS[1], 'publishing', '1')
  redis.call('ZADD', LEASES, now + tonumber(ARGV[4]), id)
end
return {'ok', token}
