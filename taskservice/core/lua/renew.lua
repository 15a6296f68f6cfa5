-- The worker's heartbeat. KEYS[1] lease set. ARGV[3] worker name, ARGV[4]
-- lease (ms), ARGV[5] how many of the ids that follow the worker is running;
-- the rest it holds unstarted (prefetched, or waiting for a countdown).
-- Renews the lease of each task this worker runs (STARTED by it) or holds
-- (PENDING, its Start confirmed). A lease that has lapsed is never renewed:
-- the task ends LOST here, as any read would end it.
-- -> {gone, unknown}: the ids that are no longer this worker's, which it must
-- stop (running) or drop (held): ended LOST (or just now), or run by another
-- worker; and the ids without a record (not taskservice's tasks, or expired).
-- Not renewed and not returned: a held task whose Start is not yet confirmed
-- (its provisional lease covers it), a task already back to PENDING (a retry)
-- or not yet marked STARTED, and one that ended otherwise (its body is done,
-- or a Cancel stops it).
local now = now_ms()
local deadline = now + tonumber(ARGV[4])
local gone, unknown = {}, {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local rkey = task_key(id)
  local state = current(rkey, id, now)
  local r = redis.call('HMGET', rkey, 'worker', 'publishing')
  local renew = false
  if state == 'STARTED' then
    renew = r[1] == ARGV[3]
    if not renew then gone[#gone + 1] = id end
  elseif state == 'PENDING' then
    renew = i > 5 + tonumber(ARGV[5]) and not r[2]
  elseif state == 'LOST' then
    gone[#gone + 1] = id
  elseif not state then
    unknown[#unknown + 1] = id
  end
  if renew then redis.call('ZADD', KEYS[1], deadline, id) end
end
return {gone, unknown}
