-- Publishing failed or took too long. KEYS[1] record. ARGV[3] task id,
-- ARGV[4] error message, ARGV[5] '1' to withdraw a confirmed task too while
-- it is still queued (its replicas never confirmed its Start: the worker
-- refuses the message, ended), '' otherwise.
-- -> {'abandoned', record JSON} | {'moved', record JSON} (a worker already
-- started it, or it ended: the message did reach the broker) | {'missing', ''}
if redis.call('HEXISTS', KEYS[1], 'publishing') == 1
    or (ARGV[5] == '1' and redis.call('HGET', KEYS[1], 'state') == 'PENDING') then
  return {'abandoned', abandon(KEYS[1], ARGV[3], now_ms(), ARGV[4])}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
return {'moved', (snapshot(KEYS[1]))}
