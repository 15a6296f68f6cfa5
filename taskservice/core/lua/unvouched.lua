-- Which of the tasks ARGV[3..] nobody vouches for: the record is PENDING
-- (QUEUED: neither started nor ended) and the task has no entry in the lease
-- set KEYS[1] (no worker holds it, no Start is still waiting for its broker).
-- A task without a record was not started through taskservice (or its record
-- expired): never one of them. Reads only. -> {ids}
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', task_key(id), 'state') == 'PENDING'
      and not redis.call('ZSCORE', KEYS[1], id) then
    out[#out + 1] = id
  end
end
return out
