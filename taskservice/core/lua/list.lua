-- ListTasks: one page from an index, newest first. KEYS[1] the index.
-- ARGV[3] cursor score ('+inf' at first), ARGV[4] cursor id ('' at first: the
-- page continues after the entry (score, id)), ARGV[5] page size, ARGV[6] the
-- most entries to look at, ARGV[7] wanted states (',A,B,' or '' for any),
-- ARGV[8] task name ('' any), ARGV[9] exclusivity key ('' any).
-- -> {more (0|1), last score, last id, score, record JSON, score, record JSON...}
local now = now_ms()
local want, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local cursor_score, cursor_id = ARGV[3], ARGV[4]
local out = {}
local looked = 0
local last_score, last_id = cursor_score, cursor_id
local offset = 0
local chunk = math.min(budget, want + 20)
while #out < 2 * want and looked < budget do
  local entries = redis.call('ZREVRANGEBYSCORE', KEYS[1], cursor_score, '-inf',
    'WITHSCORES', 'LIMIT', offset, chunk)
  if #entries == 0 then return {0, last_score, last_id, unpack(out)} end
  offset = offset + #entries / 2
  for i = 1, #entries, 2 do
    local id, score = entries[i], entries[i + 1]
    -- Entries with the cursor's score sort by id, descending: skip those
    -- the previous page already covered.
    if not (cursor_id ~= '' and score == cursor_score and id >= cursor_id) then
      looked = looked + 1
      last_score, last_id = score, id
      local rkey = task_key(id)
      local state = current(rkey, id, now)
      if not state or (KEYS[1] == ACTIVE_INDEX and TERMINAL[state]) then
        redis.call('ZREM', KEYS[1], id)
      else
        local payload, rec = snapshot(rkey)
        if (ARGV[7] == '' or string.find(ARGV[7], ',' .. state .. ',', 1, true))
            and (ARGV[8] == '' or rec['name'] == ARGV[8])
            and (ARGV[9] == '' or rec['key'] == ARGV[9]) then
          out[#out + 1] = score
          out[#out + 1] = payload
          if #out == 2 * want then break end
        end
      end
      if looked >= budget then break end
    end
  end
  if #entries < 2 * chunk and #out < 2 * want and looked < budget then
    return {0, last_score, last_id, unpack(out)}
  end
end
return {1, last_score, last_id, unpack(out)}
