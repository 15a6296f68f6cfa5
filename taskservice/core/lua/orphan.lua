-- A worker holds a task message that a Start sent (it carries the claim
-- header), but the task has no record: Redis lost it (a failover to a replica
-- that never got the claim, a restart without persistence). The worker does
-- not run it; this writes what the worker knows, ended LOST, so that the id
-- answers and watchers hear of it. The exclusivity key's holder is left
-- alone: whoever holds it now holds it by a claim Redis kept.
-- KEYS[1] record. ARGV[3] task id, ARGV[4..] field pairs (id, name, state...).
-- -> {'recorded', record JSON} | {'exists', record JSON} (a record after all)
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', (snapshot(KEYS[1]))} end
local now = now_ms()
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HSET', KEYS[1], 'finished', seconds(now))
index(ARGV[3], now, redis.call('HGET', KEYS[1], 'name'), redis.call('HGET', KEYS[1], 'key'))
redis.call('ZREM', ACTIVE_INDEX, ARGV[3])
return {'recorded', commit(KEYS[1], true)}
