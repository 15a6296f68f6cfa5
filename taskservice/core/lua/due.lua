-- The dispatcher (every server runs it): send up to ARGV[3] deferred tasks
-- whose time has come (a start time, or a turn for their key that a server
-- must publish). A message built ahead is pushed here; for the others the
-- caller publishes the delivery returned and then runs `sent`: until then
-- the entry is due again ARGV[4] ms later, so a server that stops halfway
-- leaves it to another (a message sent twice runs once: the record decides).
-- KEYS[1] the due set. -> {entries looked at, hand-overs so far (the
-- deployment's count), then id, delivery JSON, ...}
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {#ids, redis.call('HGET', STATS, 'handovers') or '0'}
for _, id in ipairs(ids) do
  local rkey = task_key(id)
  local r = redis.call('HMGET', rkey, 'state', 'waiting_for')
  local skey = send_key(id)
  local s = redis.call('HMGET', skey, 'list', 'message', 'delivery')
  if r[1] ~= 'PENDING' or r[2] or not (s[1] or s[3]) then
    redis.call('ZREM', KEYS[1], id)  -- ended, or sent already
  elseif s[1] then
    redis.call('LPUSH', s[1], s[2])
    redis.call('DEL', skey)
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), id)
    out[#out + 1] = id
    out[#out + 1] = s[3]
  end
end
return out
