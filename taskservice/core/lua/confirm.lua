-- The broker has the message: drop the provisional lease (a task waiting in
-- the broker needs none). KEYS[1] record. ARGV[3] task id.
-- -> {'ok', ''} | {'missing', ''} | {'moved', record JSON} (a worker started
-- it, a Cancel ended it, or it was abandoned, before this ran)
if redis.call('HDEL', KEYS[1], 'publishing') == 1 then
  redis.call('ZREM', LEASES, ARGV[3])
  return {'ok', ''}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
return {'moved', (snapshot(KEYS[1]))}
