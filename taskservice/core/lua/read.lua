-- A read that first ends the task if its lease lapsed. KEYS[1] record.
-- ARGV[3] task id. -> record JSON, or nil if there is no record.
if not current(KEYS[1], ARGV[3], now_ms()) then return false end
return (snapshot(KEYS[1]))
