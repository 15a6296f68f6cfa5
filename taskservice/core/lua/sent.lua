-- The broker has a deferred task's message (published by the dispatcher):
-- it is due no more. KEYS[1] the due set. ARGV[3] task id. -> 1
redis.call('ZREM', KEYS[1], ARGV[3])
redis.call('DEL', send_key(ARGV[3]))
return 1
