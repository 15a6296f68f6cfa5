-- Cancel. KEYS[1] record. ARGV[3] task id, ARGV[4] mode, ARGV[5] end time.
-- A queued task ends REVOKED at once; a running one records the strongest
-- mode asked for so far (a later Cancel escalates, never softens).
-- -> {'cancelled', JSON} | {'requested', JSON} | {'ended', JSON} | {'missing', ''}
local id = ARGV[3]
local state = current(KEYS[1], id, now_ms())
if not state then return {'missing', ''} end
if state == 'PENDING' then
  return {'cancelled', finish(KEYS[1], id, 'REVOKED', {'cancel', ARGV[4], 'finished', ARGV[5]})}
end
if state == 'STARTED' then
  return {'requested', (ask_to_stop(KEYS[1], ARGV[4]))}
end
return {'ended', (snapshot(KEYS[1]))}
