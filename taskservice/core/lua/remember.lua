-- Remember a call's answer under its request id. KEYS[1] request key.
-- ARGV[3] fingerprint, ARGV[4] response, ARGV[5] TTL.
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[3], 'response', ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return 1
