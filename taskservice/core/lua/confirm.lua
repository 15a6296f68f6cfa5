-- The broker has the message: drop the provisional lease (a task waiting in
-- the broker needs none). KEYS[1] record. ARGV[3] task id, ARGV[4] broker
-- list to push the task's message on now ('' if it was published already:
-- a claim that must reach replicas first pushes only here), ARGV[5] the message.
-- -> {'ok', ''} | {'missing', ''} | {'moved', record JSON} (a worker started
-- it, a Cancel ended it, or it was abandoned, before this ran: nothing pushed)
if redis.call('HDEL', KEYS[1], 'publishing') == 1 then
  redis.call('ZREM', LEASES, ARGV[3])
  if ARGV[4] ~= '' then redis.call('LPUSH', ARGV[4], ARGV[5]) end
  return {'ok', ''}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
return {'moved', (snapshot(KEYS[1]))}
