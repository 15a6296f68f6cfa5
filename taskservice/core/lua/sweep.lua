-- The sweeper: end up to ARGV[3] tasks whose lease lapsed. Each expiry is one
-- atomic check-and-end, so servers sweeping together never end a task twice.
-- KEYS[1] lease set. -> {tasks ended, leases looked at, then for each task
-- ended: id, name, exclusivity key ('' for none), state, error type}
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {0, #due}
for _, id in ipairs(due) do
  local rkey = task_key(id)
  local state = redis.call('HGET', rkey, 'state')
  if state and ACTIVE[state] then
    expire(rkey, id, state, now)
    out[1] = out[1] + 1
    local r = redis.call('HMGET', rkey, 'name', 'key', 'state', 'error_type')
    out[#out + 1] = id
    for i = 1, 4 do out[#out + 1] = r[i] or '' end
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
