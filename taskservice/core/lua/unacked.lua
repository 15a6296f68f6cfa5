-- The Celery broker's messages that a worker took more than ARGV[3] ms ago
-- and has not acknowledged (kombu's Redis transport, when the broker is this
-- Redis): KEYS[1] its index (delivery tag -> when the worker took it, in
-- seconds on that worker's clock), KEYS[2] its hash (delivery tag -> the
-- message). Oldest first, skipping ARGV[4] entries, at most ARGV[5]. Reads
-- only: taskservice.server.unacked decides what to put back, and kombu does.
-- -> {entries looked at, then tag and message of each still in the hash}
local now = now_ms()
local before = string.format('%.3f', (now - tonumber(ARGV[3])) / 1000)
local tags = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before,
  'LIMIT', tonumber(ARGV[4]), tonumber(ARGV[5]))
local out = {#tags}
for _, tag in ipairs(tags) do
  local message = redis.call('HGET', KEYS[2], tag)
  if message then
    out[#out + 1] = tag
    out[#out + 1] = message
  end
end
return out
