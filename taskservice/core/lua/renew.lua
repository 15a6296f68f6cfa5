-- The worker's heartbeat. KEYS[1] lease set. ARGV[3] worker name, ARGV[4]
-- lease (ms), ARGV[5] how many of the ids that follow the worker is running;
-- the rest it holds unstarted (prefetched, or waiting for a countdown).
-- Renews the lease of each task this worker runs (STARTED by it) or holds
-- (still PENDING, its Start confirmed); returns the ids it did not renew.
local deadline = now_ms() + tonumber(ARGV[4])
local last_running = 5 + tonumber(ARGV[5])
local skipped = {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local r = redis.call('HMGET', task_key(id), 'state', 'worker', 'publishing')
  local mine
  if i <= last_running then
    mine = r[1] == 'STARTED' and r[2] == ARGV[3]
  else
    mine = r[1] == 'PENDING' and not r[3]
  end
  if mine then
    redis.call('ZADD', KEYS[1], deadline, id)
  else
    skipped[#skipped + 1] = id
  end
end
return skipped
