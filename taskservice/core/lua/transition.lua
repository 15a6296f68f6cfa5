-- A change from the worker: progress, an outcome, a retry's return to the
-- queue. KEYS[1] record. ARGV[3] task id, ARGV[4] allowed states (comma list),
-- ARGV[5] new state ('' keeps it), ARGV[6..] field pairs.
-- -> {'ok', record JSON} | {'rejected', current state} | {'missing', ''}
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if string.find(',' .. ARGV[4] .. ',', ',' .. state .. ',', 1, true) == nil then
  return {'rejected', state}
end
local new = ARGV[5]
if TERMINAL[new] then
  return {'ok', finish(KEYS[1], ARGV[3], new, {unpack(ARGV, 6)})}
end
if new ~= '' then redis.call('HSET', KEYS[1], 'state', new) end
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
return {'ok', commit(KEYS[1])}
