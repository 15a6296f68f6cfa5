"""Every Lua script that changes a task record, and the arguments each takes.

One module so that the rules live in one place: who may hold an exclusivity
key, when a lease counts as lapsed, what ends a task. The server (redis.asyncio)
and the worker (redis-py) both build a `Call` here and run it with their own
client; `tests/unit/test_scripts.py` checks each script's refusals against a
real Redis.

Time comes from Redis (`TIME`), so lease deadlines do not depend on the
clocks of servers and workers. Each script reads ARGV[1] (key prefix) and
ARGV[2] (record TTL, seconds) first; the rest is per script, below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis.exceptions

from taskservice.core import record

_PRELUDE = (
    """
local PREFIX = ARGV[1]
local TTL = tonumber(ARGV[2])
local LEASES = PREFIX .. ':leases'
local CHANNEL = PREFIX .. ':events'
local ACTIVE = {PENDING = true, STARTED = true}
local TERMINAL = {SUCCESS = true, FAILURE = true, REVOKED = true, LOST = true}
local RANK = {GRACEFUL = 1, TERMINATE = 2, KILL = 3}
local LOG_LENGTH = """
    + str(record.LOG_LENGTH)
    + """

local INDEX = PREFIX .. ':index'
local ACTIVE_INDEX = INDEX .. ':active'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function seconds(ms) return string.format('%.3f', ms / 1000) end

local function task_key(id) return PREFIX .. ':task:{' .. id .. '}' end

local function snapshot(rkey)
  local flat = redis.call('HGETALL', rkey)
  local rec = {}
  for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
  return cjson.encode(rec), rec
end

-- A change: bump the sequence, keep the record for TTL from now, append it
-- to the task's log (so a watch can resume; a terminal change need not be:
-- it stays the record itself) and tell watchers.
local function commit(rkey, terminal)
  redis.call('HINCRBY', rkey, 'seq', 1)
  redis.call('EXPIRE', rkey, TTL)
  local payload, rec = snapshot(rkey)
  if not terminal then
    local log = PREFIX .. ':log:{' .. rec['id'] .. '}'
    redis.call('RPUSH', log, payload)
    redis.call('LTRIM', log, -LOG_LENGTH, -1)
    redis.call('EXPIRE', log, TTL)
  end
  redis.call('PUBLISH', CHANNEL, rec['id'] .. ' ' .. payload)
  return payload
end

-- No lease means nobody has to prove liveness (waiting in the broker): never lapsed.
local function lapsed(id, now)
  local deadline = redis.call('ZSCORE', LEASES, id)
  return deadline ~= false and tonumber(deadline) <= now
end

-- End an active task. A task whose cancel was requested ends REVOKED,
-- whatever else ended it: the caller asked for it to stop.
local function finish(rkey, id, state, fields)
  if state ~= 'REVOKED' and redis.call('HEXISTS', rkey, 'cancel') == 1 then
    state = 'REVOKED'
  end
  redis.call('HSET', rkey, 'state', state, unpack(fields))
  redis.call('HDEL', rkey, 'publishing')
  redis.call('ZREM', LEASES, id)
  redis.call('ZREM', ACTIVE_INDEX, id)
  return commit(rkey, true)
end

-- List a new task, newest first by its creation (ms), in the indexes
-- ListTasks pages through: all tasks, the active ones, per type, per key.
-- Entries older than twice the record TTL are trimmed as new ones come (a
-- record lives TTL after its last change); an entry whose record expired
-- sooner is dropped when a listing meets it.
local function index(id, now, name, key)
  local old = now - 2000 * TTL
  local lists = {INDEX, ACTIVE_INDEX, INDEX .. ':name:' .. name}
  if key then lists[4] = INDEX .. ':key:' .. key end
  for _, list in ipairs(lists) do
    redis.call('ZADD', list, now, id)
    redis.call('ZREMRANGEBYSCORE', list, '-inf', old)
    redis.call('EXPIRE', list, 2 * TTL)
  end
end

-- A Start whose message never reached the broker: give the exclusivity key
-- back to the task that held it before (compare-and-set: only if this task
-- still holds it), and end the task so that a message that got through
-- after all is refused by the worker.
local function abandon(rkey, id, now, message)
  local req = redis.call('HGET', rkey, 'request')
  if req and redis.call('HGET', req, 'task') == id then
    redis.call('DEL', req)  -- a retry of this Start must run anew
  end
  local key = redis.call('HGET', rkey, 'key')
  if key then
    local hkey = PREFIX .. ':key:{' .. key .. '}'
    if redis.call('GET', hkey) == id then
      local prev = redis.call('HGET', rkey, 'prev')
      if prev then redis.call('SET', hkey, prev, 'KEEPTTL') else redis.call('DEL', hkey) end
    end
  end
  return finish(rkey, id, 'REVOKED', {'finished', seconds(now),
    'error_type', 'NotEnqueued', 'error_message', message})
end

-- End a task whose lease lapsed.
local function expire(rkey, id, state, now)
  if redis.call('HEXISTS', rkey, 'publishing') == 1 then
    return abandon(rkey, id, now,
      'never enqueued: the server that accepted it stopped before confirming '
      .. 'the broker had it; it will not run')
  end
  local worker = redis.call('HGET', rkey, 'worker')
  local why = 'its worker stopped heartbeating'
  if worker then why = 'its worker ' .. worker .. ' stopped heartbeating' end
  if state == 'PENDING' then why = why .. ' before starting it; it will not run' end
  return finish(rkey, id, 'LOST', {'finished', seconds(now),
    'error_type', 'WorkerLostError', 'error_message', why})
end

-- The record's state, after ending it if its lease lapsed; false if missing.
local function current(rkey, id, now)
  local state = redis.call('HGET', rkey, 'state')
  if state and ACTIVE[state] and lapsed(id, now) then
    expire(rkey, id, state, now)
    state = redis.call('HGET', rkey, 'state')
  end
  return state
end
"""
)

# KEYS[1] the new record, KEYS[2] the key's holder (only with a key).
# ARGV[3] task id, ARGV[4] provisional lease (ms), ARGV[5] request key ('' for
# none), ARGV[6] request fingerprint, ARGV[7] request TTL, ARGV[8] broker list
# to push the task's message on ('' when the server publishes it itself, then
# under a provisional lease), ARGV[9] the message, ARGV[10..] fields.
# -> {'ok', ''} | {'held', holder record JSON} | {'repeat', task id of the
# earlier Start with this request id} | {'reused', ''} (other parameters)
_CLAIM = """
local now = now_ms()
local id = ARGV[3]
-- The record exists: this claim was sent again (a retry after a lost reply).
if redis.call('EXISTS', KEYS[1]) == 1 then return {'ok', ''} end
local req = ARGV[5]
if req ~= '' then
  local seen = redis.call('HMGET', req, 'fingerprint', 'task')
  if seen[1] then
    if seen[1] ~= ARGV[6] then return {'reused', ''} end
    return {'repeat', seen[2]}
  end
end
local prev = false
if KEYS[2] then
  prev = redis.call('GET', KEYS[2])
  if prev then
    local pkey = task_key(prev)
    local state = current(pkey, prev, now)
    if state and ACTIVE[state] then return {'held', (snapshot(pkey))} end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 10))
if prev then redis.call('HSET', KEYS[1], 'prev', prev) end
redis.call('EXPIRE', KEYS[1], TTL)
if KEYS[2] then redis.call('SET', KEYS[2], id, 'EX', TTL) end
index(id, now, redis.call('HGET', KEYS[1], 'name'), redis.call('HGET', KEYS[1], 'key'))
if req ~= '' then
  redis.call('HSET', KEYS[1], 'request', req)
  redis.call('HSET', req, 'fingerprint', ARGV[6], 'task', id)
  redis.call('EXPIRE', req, tonumber(ARGV[7]))
end
if ARGV[8] ~= '' then
  redis.call('LPUSH', ARGV[8], ARGV[9])  -- enqueued with its claim
else
  redis.call('HSET', KEYS[1], 'publishing', '1')
  redis.call('ZADD', LEASES, now + tonumber(ARGV[4]), id)
end
return {'ok', ''}
"""

# The broker has the message: drop the provisional lease (a task waiting in
# the broker needs none). KEYS[1] record. ARGV[3] task id.
# -> {'ok', ''} | {'missing', ''} | {'moved', record JSON} (a worker started
# it, a Cancel ended it, or it was abandoned, before this ran)
_CONFIRM = """
if redis.call('HDEL', KEYS[1], 'publishing') == 1 then
  redis.call('ZREM', LEASES, ARGV[3])
  return {'ok', ''}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
return {'moved', (snapshot(KEYS[1]))}
"""

# Publishing failed or took too long. KEYS[1] record. ARGV[3] task id,
# ARGV[4] error message.
# -> {'abandoned', record JSON} | {'moved', record JSON} (a worker already
# started it, or it ended: the message did reach the broker) | {'missing', ''}
_ABANDON = """
if redis.call('HEXISTS', KEYS[1], 'publishing') == 1 then
  return {'abandoned', abandon(KEYS[1], ARGV[3], now_ms(), ARGV[4])}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
return {'moved', (snapshot(KEYS[1]))}
"""

# A worker is about to run the task body. KEYS[1] record. ARGV[3] task id,
# ARGV[4] worker name, ARGV[5] run token (unique per execution), ARGV[6]
# lease (ms), ARGV[7] start time.
# -> {'started', record JSON} (also when this run's own start is retried)
#  | {'running', worker} (another execution holds a live lease)
#  | {'ended', state} | {'missing', ''}
_START = """
local now = now_ms()
local id = ARGV[3]
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if state == 'PENDING' then
  redis.call('HSET', KEYS[1], 'state', 'STARTED', 'worker', ARGV[4], 'run', ARGV[5],
    'started', ARGV[7])
  redis.call('HDEL', KEYS[1], 'publishing')
  redis.call('ZADD', LEASES, now + tonumber(ARGV[6]), id)
  return {'started', commit(KEYS[1])}
end
if state == 'STARTED' then
  if redis.call('HGET', KEYS[1], 'run') == ARGV[5] then
    return {'started', (snapshot(KEYS[1]))}
  end
  if lapsed(id, now) then
    expire(KEYS[1], id, state, now)
    return {'ended', redis.call('HGET', KEYS[1], 'state')}
  end
  return {'running', redis.call('HGET', KEYS[1], 'worker') or ''}
end
return {'ended', state}
"""

# A change from the worker: progress, an outcome, a retry's return to the
# queue. KEYS[1] record. ARGV[3] task id, ARGV[4] allowed states (comma list),
# ARGV[5] new state ('' keeps it), ARGV[6..] field pairs.
# -> {'ok', record JSON} | {'rejected', current state} | {'missing', ''}
_TRANSITION = """
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
"""

# Cancel. KEYS[1] record. ARGV[3] task id, ARGV[4] mode, ARGV[5] end time.
# A queued task ends REVOKED at once; a running one records the strongest
# mode asked for so far (a later Cancel escalates, never softens).
# -> {'cancelled', JSON} | {'requested', JSON} | {'ended', JSON} | {'missing', ''}
_CANCEL = """
local id = ARGV[3]
local state = current(KEYS[1], id, now_ms())
if not state then return {'missing', ''} end
if state == 'PENDING' then
  return {'cancelled', finish(KEYS[1], id, 'REVOKED', {'cancel', ARGV[4], 'finished', ARGV[5]})}
end
if state == 'STARTED' then
  local mode = redis.call('HGET', KEYS[1], 'cancel')
  if not mode or RANK[ARGV[4]] > (RANK[mode] or 0) then
    redis.call('HSET', KEYS[1], 'cancel', ARGV[4])
    return {'requested', commit(KEYS[1])}
  end
  return {'requested', (snapshot(KEYS[1]))}
end
return {'ended', (snapshot(KEYS[1]))}
"""

# A read that first ends the task if its lease lapsed. KEYS[1] record.
# ARGV[3] task id. -> record JSON, or nil if there is no record.
_READ = """
if not current(KEYS[1], ARGV[3], now_ms()) then return false end
return (snapshot(KEYS[1]))
"""

# The worker's heartbeat. KEYS[1] lease set. ARGV[3] worker name, ARGV[4]
# lease (ms), ARGV[5] how many of the ids that follow the worker is running;
# the rest it holds unstarted (prefetched, or waiting for a countdown).
# Renews the lease of each task this worker runs (STARTED by it) or holds
# (still PENDING, its Start confirmed); returns the ids it did not renew.
_RENEW = """
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
"""

# A worker hands tasks back unstarted (warm shutdown: their messages return to
# the queue): drop their leases, so they wait in the broker again.
# KEYS[1] lease set. ARGV[3..] task ids. -> number of leases dropped.
_RELEASE = """
local dropped = 0
for i = 3, #ARGV do
  local r = redis.call('HMGET', task_key(ARGV[i]), 'state', 'publishing')
  if r[1] == 'PENDING' and not r[2] then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return dropped
"""

# The sweeper: end up to ARGV[3] tasks whose lease lapsed. Each expiry is one
# atomic check-and-end, so servers sweeping together never end a task twice.
# KEYS[1] lease set. -> {tasks ended, leases looked at, then for each task
# ended: id, name, exclusivity key ('' for none), state, error type}
_SWEEP = """
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {0, #due}
for _, id in ipairs(due) do
  local rkey = task_key(id)
  local state = redis.call('HGET', rkey, 'state')
  if state and ACTIVE[state] then
    expire(rkey, id, state, now)
    out[1] = out[1] + 1
    local r = redis.call('HMGET', rkey, 'name', 'key', 'state', 'error_type')
    out[#out + 1] = id
    for i = 1, 4 do out[#out + 1] = r[i] or '' end
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

# ListTasks: one page from an index, newest first. KEYS[1] the index.
# ARGV[3] cursor score ('+inf' at first), ARGV[4] cursor id ('' at first: the
# page continues after the entry (score, id)), ARGV[5] page size, ARGV[6] the
# most entries to look at, ARGV[7] wanted states (',A,B,' or '' for any),
# ARGV[8] task name ('' any), ARGV[9] exclusivity key ('' any).
# -> {more (0|1), last score, last id, score, record JSON, score, record JSON...}
_LIST = """
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
"""

# Remember a call's answer under its request id. KEYS[1] request key.
# ARGV[3] fingerprint, ARGV[4] response, ARGV[5] TTL.
_REMEMBER = """
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[3], 'response', ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return 1
"""

CLAIM = _PRELUDE + _CLAIM
CONFIRM = _PRELUDE + _CONFIRM
ABANDON = _PRELUDE + _ABANDON
START = _PRELUDE + _START
TRANSITION = _PRELUDE + _TRANSITION
CANCEL = _PRELUDE + _CANCEL
READ = _PRELUDE + _READ
RENEW = _PRELUDE + _RENEW
RELEASE = _PRELUDE + _RELEASE
SWEEP = _PRELUDE + _SWEEP
REMEMBER = _PRELUDE + _REMEMBER
LIST = _PRELUDE + _LIST


@dataclass(frozen=True, slots=True)
class Call:
    """One script run: its source, KEYS and ARGV."""

    script: str
    keys: list[str]
    args: list[str]


@dataclass(frozen=True, slots=True)
class Request:
    """A caller's request id (AIP-155), with what it asked for and how long
    the answer is remembered."""

    id: str
    fingerprint: str
    ttl: int


@dataclass(frozen=True, slots=True)
class Scripts:
    """Builds the calls of one deployment (key prefix, record TTL)."""

    prefix: str
    ttl: int

    def _call(self, script: str, keys: list[str], *args: str) -> Call:
        return Call(script, keys, [self.prefix, str(self.ttl), *args])

    def _task(self, script: str, task_id: str, *args: str) -> Call:
        return self._call(script, [record.task_key(self.prefix, task_id)], task_id, *args)

    def claim(
        self,
        fields: Mapping[str, str],
        *,
        exclusivity_key: str,
        provisional_ms: int,
        request: Request | None = None,
        push: tuple[str, str] | None = None,
    ) -> Call:
        """With `push` (broker list, message), the message is enqueued in the
        same step; without, the claim waits provisionally for `confirm`."""
        task_id = fields["id"]
        keys = [record.task_key(self.prefix, task_id)]
        if exclusivity_key:
            keys.append(record.holder_key(self.prefix, exclusivity_key))
        if request is None:
            request_args = ["", "", "0"]
        else:
            request_args = [
                record.request_key(self.prefix, request.id),
                request.fingerprint,
                str(request.ttl),
            ]
        push_args = list(push) if push else ["", ""]
        return self._call(
            CLAIM, keys, task_id, str(provisional_ms), *request_args, *push_args, *_pairs(fields)
        )

    def confirm(self, task_id: str) -> Call:
        return self._task(CONFIRM, task_id)

    def abandon(self, task_id: str, message: str) -> Call:
        return self._task(ABANDON, task_id, message)

    def start(self, task_id: str, *, worker: str, run: str, lease_ms: int, when: float) -> Call:
        return self._task(START, task_id, worker, run, str(lease_ms), repr(when))

    def transition(
        self,
        task_id: str,
        allowed: Iterable[str],
        new_state: str = "",
        fields: Mapping[str, str] | None = None,
    ) -> Call:
        return self._task(
            TRANSITION, task_id, ",".join(sorted(allowed)), new_state, *_pairs(fields or {})
        )

    def cancel(self, task_id: str, mode: str, *, when: float) -> Call:
        return self._task(CANCEL, task_id, mode, repr(when))

    def read(self, task_id: str) -> Call:
        return self._task(READ, task_id)

    def renew(
        self, running: Iterable[str], held: Iterable[str], *, worker: str, lease_ms: int
    ) -> Call:
        running = list(running)
        leases = [record.leases_key(self.prefix)]
        return self._call(RENEW, leases, worker, str(lease_ms), str(len(running)), *running, *held)

    def release(self, task_ids: Iterable[str]) -> Call:
        return self._call(RELEASE, [record.leases_key(self.prefix)], *task_ids)

    def remember(self, request: Request, response: str) -> Call:
        key = record.request_key(self.prefix, request.id)
        return self._call(REMEMBER, [key], request.fingerprint, response, str(request.ttl))

    def sweep(self, limit: int) -> Call:
        return self._call(SWEEP, [record.leases_key(self.prefix)], str(limit))

    def list_page(
        self,
        index: str,
        *,
        after: tuple[str, str] | None,
        size: int,
        budget: int,
        states: Iterable[str] = (),
        name: str = "",
        exclusivity_key: str = "",
    ) -> Call:
        """One page of `index` (see record.index_key) after the cursor
        `after` = (score, id) of the previous page's last entry."""
        score, last = after or ("+inf", "")
        wanted = "".join(f",{state}" for state in sorted(states))
        return self._call(
            LIST,
            [index],
            score,
            last,
            str(size),
            str(budget),
            wanted + "," if wanted else "",
            name,
            exclusivity_key,
        )


def transient(error: BaseException) -> bool:
    """True for the errors a Redis restart or failover causes, which pass by
    themselves (a retry is worth it); False for wrong credentials and the like."""
    return isinstance(
        error,
        (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,
            redis.exceptions.TryAgainError,
        ),
    ) and not isinstance(
        error, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)
    )


def _pairs(fields: Mapping[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, value]
    return flat
