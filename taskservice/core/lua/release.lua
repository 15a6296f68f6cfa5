-- A worker hands tasks back unstarted (warm shutdown: their messages return to
-- the queue): drop their leases, so they wait in the broker again.
-- KEYS[1] lease set. ARGV[3..] task ids. -> number of leases dropped.
local dropped = 0
for i = 3, #ARGV do
  local r = redis.call('HMGET', task_key(ARGV[i]), 'state', 'publishing')
  if r[1] == 'PENDING' and not r[2] then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return dropped
