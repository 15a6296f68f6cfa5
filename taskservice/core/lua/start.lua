-- A worker is about to run the task body. KEYS[1] record. ARGV[3] task id,
-- ARGV[4] worker name, ARGV[5] run token (unique per execution), ARGV[6]
-- lease (ms), ARGV[7] start time.
-- -> {'started', record JSON} (also when this run's own start is retried)
--  | {'running', worker} (another execution holds a live lease)
--  | {'ended', state} | {'missing', ''}
local now = now_ms()
local id = ARGV[3]
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if state == 'PENDING' and lapsed(id, now) then
  -- Held unstarted by a worker that stopped renewing it (or never confirmed
  -- in the broker): it ended, though nothing had swept it yet.
  expire(KEYS[1], id, state, now)
  return {'ended', redis.call('HGET', KEYS[1], 'state')}
end
if state == 'PENDING' then
  redis.call('HSET', KEYS[1], 'state', 'STARTED', 'worker', ARGV[4], 'run', ARGV[5],
    'started', ARGV[7])
  redis.call('HDEL', KEYS[1], 'publishing')
  redis.call('ZADD', LEASES, now + tonumber(ARGV[6]), id)
  return {'started', commit(KEYS[1])}
end
if state == 'STARTED' then
  if redis.call('HGET', KEYS[1], 'run') == ARGV[5] then
    return {'started', (snapshot(KEYS[1]))}
  end
  if lapsed(id, now) then
    expire(KEYS[1], id, state, now)
    return {'ended', redis.call('HGET', KEYS[1], 'state')}
  end
  return {'running', redis.call('HGET', KEYS[1], 'worker') or ''}
end
return {'ended', state}
