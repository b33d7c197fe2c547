"""A broker on Redis Streams, through ``redis.asyncio`` (redis-py >= 5).

Key layout (``p`` is the prefix, default ``acall:b:``; the data store's default is
``acall:data:``, so neither ever scans or deletes the other's keys)::

    p inv:{id}          string  the InvocationRecord as DTOCodec JSON; finished ones
                                expire after record_ttl, pending ones never
    p dedup:{key}       string  dedup key -> id of the invocation holding it
    p status:{status}   zset    invocation ids by status (score: expiry time, 2**53 - 1
                                for records that do not expire), for counts()
    p call:{call key}   zset    ids of the call's invocations (score: p seq at
                                submission), for find_by_call(); persistent while one
                                of them is unfinished, else it expires with the last
    p seq               string  counter giving the call index its submission order
    p q:{queue}         stream  queue entries {"id": invocation id}; consumer group
                                "acall-workers"; an entry is XACKed and XDELed on ack
    p inflight:{queue}  zset    stream entry id -> time its visibility timeout ends, in
                                whole milliseconds
    p delayed:{queue}   zset    invocation id -> time it becomes deliverable
    p final             pub/sub  ids of invocations that became final (one message
                                per finished batch, separated by spaces)

Every operation that reads and writes is one Lua script, so it is atomic: receive
claims entries and marks their records RUNNING in one script, and finish records a
batch of outcomes and acks their entries in one script call (for a batch larger than
500, one pipeline of script calls, each atomic on its own). redis-py re-sends a
command after a dropped connection, so the scripts are idempotent (submit and update
by invocation id; ack, extend, release and retry by receipt; finish by both: an
outcome is stored once, an entry acked once), except receive: one re-sent after a
lost reply claims entries again, and the ones the lost reply carried are delivered
once more when their visibility timeout ends, which at-least-once delivery allows
(their records then count one attempt more).
Times inside scripts come from the server's clock (``TIME``), the one clock every
client shares; only a record's ``not_before`` is a client's wall-clock time.

Scripts change a stored record (receive marking it RUNNING) by rewriting the values
of its top-level JSON members in place, never by decoding and re-encoding the whole
document: Lua's cjson would round floats such as ``created_at`` to 14 digits. acall
writes the members a claim changes first (:data:`acall.dto.RECORD_HEAD`), so one
anchored pattern reads and replaces them; records of another layout are searched, or
walked member by member.

Scripts batch their commands where they can (status sets, visibility deadlines,
acknowledgements: one command per set or stream for the whole batch): each command
called from Lua costs a few microseconds (about 16,000 instructions in Redis 7.0, its
reply encoded and parsed again), whatever it does. They give commands
numbers as text they format once per script (a claim's ``updated_at``, an expiry time,
a deadline): Redis turns every Lua number argument into text with printf's ``%.17g``,
and doing that for each record cost more than storing it (measured with callgrind on
redis-server: 6.5% of the server's instructions per task).

The call index ``p call:{call key}`` lists invocation ids whose records may have
expired since: find_by_call skips and removes them, each submission removes expired
ones from the front, and when an invocation of the call finishes while none is left
unfinished, the index is given the expiry of its longest-lived record.

The visibility deadline of an entry lives in ``inflight`` rather than being the
entry's idle time in the consumer group: deadlines then follow each delivery's own
visibility timeout (and :meth:`~RedisBroker.extend`'s), whatever timeout the next
consumer asks for. The group's pending list still says who holds an entry and how
often it was delivered; a receipt is the queue, the stream entry id and that delivery
count, so a redelivery makes the earlier receipt stale.

Scripts build key names from the prefix, so the broker does not run on Redis Cluster.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import anyio
from redis.asyncio import Redis
from redis.typing import KeyT, StreamIdT

from acall._redis import (
    CONNECTION_OPTIONS,
    DEFAULT_PORT,
    RedisConnection,
    check_settings,
    shown_url,
    url_arguments,
)
from acall.brokers._common import DEFAULT_RECORD_TTL, BrokerBase
from acall.brokers.base import Delivery, ScannedRecord, make_delivery
from acall.dto import InvocationRecord, InvocationStatus
from acall.errors import BrokerError, BrokerUnavailableError, ConfigurationError
from acall.stores.base import KEY_PATTERN, validate_ttl

__all__ = ["CONSUMER_GROUP", "DEFAULT_PREFIX", "RedisBroker"]

_T = TypeVar("_T")
_Read = TypeVar("_Read", InvocationRecord, InvocationRecord | InvocationStatus)

#: The consumer group every acall worker reads the queue streams with.
CONSUMER_GROUP: Final = "acall-workers"

#: The key prefix of a broker unless the URL says otherwise (the data store's default is
#: ``acall:data:``).
DEFAULT_PREFIX: Final = "acall:b:"

_URL_FORMS: Final = (
    "redis://[[user]:password@]host[:port][/db][?prefix=acall:b:&record_ttl=SECONDS] "
    "(rediss:// for TLS)"
)
_ENTRY_ID_RE: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_SUBMIT_CHUNK: Final = 500  # records per script call: bounds how long one call holds Redis
_FINISH_CHUNK: Final = 500  # outcomes per script call (one pipeline for the whole batch)
_MOVE_DUE: Final = 1000  # delayed entries moved to a stream per receive and queue
# Longest blocking read in receive(): entries released or timing out meanwhile are
# noticed after at most this long (new submissions wake the read at once).
_MAX_BLOCK: Final = 0.5
_TICK: Final = 1.0
_WATCH_BATCH: Final = 1000

_STATUSES: Final = [status.value for status in InvocationStatus]


_FINAL_STATUSES: Final = [s.value for s in InvocationStatus if s.is_final]
_LIVE_STATUSES: Final = [s.value for s in InvocationStatus if not s.is_final]
# Invocations of one call whose liveness a finishing invocation checks; a call index
# with more members stays persistent (submissions and find_by_call trim it).
_CALL_SETTLE_MAX: Final = 100
# Expired ids a submission removes from the front of its call's index.
_CALL_TRIM: Final = 2
# Status set score of records that never expire: 2**53 - 1, an integer a double holds
# exactly, some 285 million years from now.
_NEVER_EXPIRES: Final = 2**53 - 1


def _lua_list(values: Sequence[str]) -> str:
    return "{" + ", ".join(f"'{value}'" for value in values) + "}"


# Reading and rewriting top-level members of a record's JSON text without decoding it
# (see the module docstring). Plain text, not an f-string: Lua patterns are full of
# braces and backslashes.
_JSON_LUA: Final = r"""
-- Index of the quote closing the JSON string that opens at `open`.
local function string_end(text, open)
  local pos = open + 1
  while true do
    local found = string.find(text, '["\\]', pos)
    if not found then
      return nil
    end
    if string.sub(text, found, found) == '"' then
      return found
    end
    pos = found + 2  -- skip the escaped character
  end
end

-- Index of the last character of the JSON value that starts at `first`.
local function value_end(text, first)
  local c = string.sub(text, first, first)
  if c == '"' then
    return string_end(text, first)
  end
  if c == '{' or c == '[' then
    local depth = 0
    local pos = first
    while true do
      local found = string.find(text, '["{}%[%]]', pos)
      if not found then
        return nil
      end
      local ch = string.sub(text, found, found)
      if ch == '"' then
        found = string_end(text, found)
        if not found then
          return nil
        end
      elseif ch == '{' or ch == '[' then
        depth = depth + 1
      else
        depth = depth - 1
        if depth == 0 then
          return found
        end
      end
      pos = found + 1
    end
  end
  local found = string.find(text, '[%s,}%]]', first)
  if not found then
    return nil
  end
  return found - 1
end

-- The top-level members of a JSON object: {key = {first, last}} (where each value's
-- text starts and ends), and the index of the closing brace; nil if not an object.
local function members(text)
  local pos = string.find(text, '%S')
  if not pos or string.sub(text, pos, pos) ~= '{' then
    return nil
  end
  local spans = {}
  pos = string.find(text, '%S', pos + 1)
  if pos and string.sub(text, pos, pos) == '}' then
    return spans, pos
  end
  while pos do
    if string.sub(text, pos, pos) ~= '"' then
      return nil
    end
    local key_end = string_end(text, pos)
    if not key_end then
      return nil
    end
    local key = string.sub(text, pos + 1, key_end - 1)
    pos = string.find(text, '%S', key_end + 1)
    if not pos or string.sub(text, pos, pos) ~= ':' then
      return nil
    end
    local first = string.find(text, '%S', pos + 1)
    if not first then
      return nil
    end
    local last = value_end(text, first)
    if not last then
      return nil
    end
    spans[key] = {first, last}
    pos = string.find(text, '%S', last + 1)
    if not pos then
      return nil
    end
    local c = string.sub(text, pos, pos)
    if c == '}' then
      return spans, pos
    end
    if c ~= ',' then
      return nil
    end
    pos = string.find(text, '%S', pos + 1)
  end
  return nil
end

-- `text` with the values of top-level members replaced, or appended when missing.
-- `values`: a list of {key, value as JSON text}.
local function with_members(text, spans, close, values)
  local edits = {}
  local added = {}
  for _, kv in ipairs(values) do
    local span = spans[kv[1]]
    if span then
      edits[#edits + 1] = {span[1], span[2], kv[2]}
    else
      added[#added + 1] = '"' .. kv[1] .. '":' .. kv[2]
    end
  end
  table.sort(edits, function(a, b) return a[1] < b[1] end)
  local parts = {}
  local pos = 1
  for _, edit in ipairs(edits) do
    parts[#parts + 1] = string.sub(text, pos, edit[1] - 1)
    parts[#parts + 1] = edit[3]
    pos = edit[2] + 1
  end
  if #added > 0 then
    parts[#parts + 1] = string.sub(text, pos, close - 1)
    if next(spans) ~= nil then
      parts[#parts + 1] = ','
    end
    parts[#parts + 1] = table.concat(added, ',')
    pos = close
  end
  parts[#parts + 1] = string.sub(text, pos)
  return table.concat(parts)
end

-- `text` with the top-level members in `changes` ({key, value as JSON text, value as
-- decoded} each) rewritten, where each member is found by a plain search for its key:
-- a few calls instead of walking every member (about 22 microseconds for a small
-- record). The first member of that name may be a nested one, so the result is decoded
-- and must show every new value at the top level; each change must alter its member
-- (the caller leaves out equal values), so a value can only show there if its own
-- member was rewritten. Returns nil when that is not certain (a nested member found
-- first, a missing or repeated member): the caller then walks every member.
local function rewrite_members_fast(text, changes)
  local spans = {}
  local order = {}
  for _, change in ipairs(changes) do
    local _, colon = string.find(text, '"' .. change[1] .. '":', 1, true)
    if not colon then
      return nil
    end
    local last = value_end(text, colon + 1)
    if not last then
      return nil
    end
    spans[change[1]] = {colon + 1, last}
    order[#order + 1] = spans[change[1]]
  end
  table.sort(order, function(a, b) return a[1] < b[1] end)
  for i = 2, #order do
    if order[i][1] <= order[i - 1][2] then
      return nil  -- one found inside another: not top-level members
    end
  end
  local edited = with_members(text, spans, nil, changes)
  local ok, doc = pcall(cjson.decode, edited)
  if not ok or type(doc) ~= 'table' then
    return nil
  end
  for _, change in ipairs(changes) do
    if doc[change[1]] ~= change[3] then
      return nil
    end
  end
  return edited
end

-- A record's head as acall writes it (acall.dto.RECORD_HEAD): its first members,
-- status, attempt, worker_id (null, or a string without escapes) and updated_at, so
-- certainly top-level ones (acall's encoder writes each member once). Returns the
-- status, the attempt and updated_at as text, the worker_id as JSON text and where the
-- rest of the document starts (its ',' or '}'); nil for any other layout (a record
-- written by an older acall, a worker id with escapes), which callers read the slow
-- way. One anchored match: about a microsecond, where decoding the record with cjson
-- takes five and rewriting members found by search another twenty.
local function record_head(text)
  local status, attempt, worker, updated, rest = string.match(text,
    '^{"status":"(%l+)","attempt":(%d+),"worker_id":(null),"updated_at":([-+.%deE]+)()[,}]')
  if not status then
    status, attempt, worker, updated, rest = string.match(text,
      '^{"status":"(%l+)","attempt":(%d+),"worker_id":("[^"\\]*"),"updated_at":([-+.%deE]+)()[,}]')
  end
  return status, attempt, worker, updated, rest
end

-- The status of a stored record ('pending' when the member is missing, as the DTO's
-- default), or nil if the text is not a JSON object with a readable status. Read from
-- the head where acall's encoder puts it, else with cjson: decoding in C costs a
-- tenth of walking the members in Lua (about 2 against 22 microseconds for a small
-- record); only rewriting needs the members' positions.
local function record_status(text)
  local head = string.match(text, '^{"status":"(%l+)"[,}]')
  if head then
    return head
  end
  if not string.find(text, '^%s*{') then
    return nil
  end
  local ok, doc = pcall(cjson.decode, text)
  if not ok or type(doc) ~= 'table' then
    return nil
  end
  local status = doc['status']
  if status == nil then
    return 'pending'
  end
  if type(status) ~= 'string' then
    return nil
  end
  return string.match(status, '^([a-z]+)$')
end
"""

_PRELUDE: Final = (
    f"""
local prefix = ARGV[1]
local GROUP = '{CONSUMER_GROUP}'
local STATUSES = {_lua_list(_STATUSES)}
local LIVE = {_lua_list(_LIVE_STATUSES)}
local FINALS = {_lua_list(_FINAL_STATUSES)}
local FINAL = {{}}
for _, s in ipairs(FINALS) do
  FINAL[s] = true
end
local KNOWN = {{}}
for _, s in ipairs(STATUSES) do
  KNOWN[s] = true
end
local CALL_SETTLE_MAX = {_CALL_SETTLE_MAX}
local CALL_TRIM = {_CALL_TRIM}
-- Numbers are given to commands as text made here: Redis turns a Lua number argument
-- into text with printf's "%.17g", which costs more than many a command.
local CALL_SETTLE_RANGE = '{_CALL_SETTLE_MAX}'
local CALL_TRIM_RANGE = '{_CALL_TRIM - 1}'
-- The status set score of a record that never expires (live ones, and finished ones
-- without a record_ttl): after any expiry time, and an integer, which a small sorted
-- set (a listpack, where each insertion compares its way past the others) compares
-- as it is, where a text such as 'inf' is parsed again at each comparison.
local NEVER = '{_NEVER_EXPIRES}'
"""
    + _JSON_LUA
    + """
local function server_time()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Records this script has just stored as final: id -> status set score (expiry time).
-- Settling a call index reads them from here instead of asking the status sets again.
local settled = {}
-- Records this script has just stored as live (their status set entry may still wait
-- in the batch below).
local fresh = {}

-- Status set changes are batched: each record's move is noted here and flush_status()
-- makes them with one ZREM per set left and one ZADD per set entered. A command called
-- from Lua costs a few microseconds however small, and a batch of 500 records
-- would otherwise make thousands of them.
local NEW = {}  -- store_record's prev for a record that did not exist: no set to leave
local moved = {}  -- ids in the order of their first move
local new_status = {}  -- id -> the status set it ends in
local new_score = {}  -- id -> its score there
local leaving = {}  -- id -> {status = true} of the sets it may be in now

local function note_status(id, status, score, prev)
  local left = leaving[id]
  if not left then
    left = {}
    leaving[id] = left
    moved[#moved + 1] = id
  end
  if prev == NEW then
    -- A record that did not exist is in no set: sets only list ids of stored records,
    -- except finished ones whose record expired, which counting trims first anyway.
  elseif prev and KNOWN[prev] then
    left[prev] = true
  else
    for _, s in ipairs(STATUSES) do
      left[s] = true
    end
  end
  new_status[id] = status
  new_score[id] = score
end

-- redis.call(command, key, [lead,] ...values), with the values in slices: Lua's unpack
-- has a limit on how many it spreads.
local function call_with(command, key, values, lead)
  for first = 1, #values, 1000 do
    local last = math.min(first + 999, #values)
    if lead then
      redis.call(command, key, lead, unpack(values, first, last))
    else
      redis.call(command, key, unpack(values, first, last))
    end
  end
end

-- Append the values to the list lists[key], made if missing.
local function append(lists, key, first, second)
  local list = lists[key]
  if not list then
    list = {}
    lists[key] = list
  end
  list[#list + 1] = first
  if second ~= nil then
    list[#list + 1] = second
  end
end

-- Make the status set changes noted so far. Every script storing records ends with it.
local function flush_status()
  local removals = {}
  local additions = {}
  for _, id in ipairs(moved) do
    local status = new_status[id]
    for s in pairs(leaving[id]) do
      if s ~= status then
        append(removals, s, id)
      end
    end
    append(additions, status, new_score[id], id)
  end
  for s, ids in pairs(removals) do
    call_with('ZREM', prefix .. 'status:' .. s, ids)
  end
  for s, args in pairs(additions) do
    -- Score and member pairs: slices of an even length keep them together.
    call_with('ZADD', prefix .. 'status:' .. s, args)
  end
  moved, new_status, new_score, leaving = {}, {}, {}, {}
end

-- Streams known to exist (a stream is only ever deleted by hand: a cached yes holds).
local streams = {}

local function stream_exists(stream)
  if streams[stream] then
    return true
  end
  if redis.call('EXISTS', stream) == 1 then
    streams[stream] = true
    return true
  end
  return false
end

local function is_live(id)
  if settled[id] then
    return false
  end
  if fresh[id] then
    return true
  end
  for _, s in ipairs(LIVE) do
    if redis.call('ZSCORE', prefix .. 'status:' .. s, id) then
      return true
    end
  end
  return false
end

-- When an invocation of a call finished: if none of the call's invocations is left
-- unfinished, let the call index expire with the longest-lived record (ids whose
-- record is gone are dropped); otherwise it stays persistent. One PTTL per listed id:
-- only finished records expire, so a record without an expiry is unfinished (or kept
-- forever), either way keeping the index.
local function settle_call_index(index, now)
  local ids = redis.call('ZRANGE', index, '0', CALL_SETTLE_RANGE)
  if #ids > CALL_SETTLE_MAX then
    return
  end
  local last = nil
  local gone = {}
  for _, id in ipairs(ids) do
    local expires = settled[id]
    if expires == nil then
      local ttl = redis.call('PTTL', prefix .. 'inv:' .. id)
      if ttl == -1 then
        return
      elseif ttl == -2 then
        expires = now  -- the record is gone
      else
        expires = now + ttl / 1000
      end
    end
    if expires == math.huge then
      return  -- a record that never expires
    end
    if expires <= now then
      gone[#gone + 1] = id
    elseif last == nil or expires > last then
      last = expires
    end
  end
  if #gone > 0 then
    redis.call('ZREM', index, unpack(gone))
  end
  if last ~= nil then
    redis.call('PEXPIRE', index, string.format('%d', math.ceil((last - now) * 1000)))
  end
end

-- Expiry times by ttl_ms, as {number, text} (`now` is one time per script): formatting
-- a number for every record of a batch would cost more than storing it.
local expiries = {}

-- Write a record and file it under its status (ttl_ms: '' when records never expire;
-- the status sets change at flush_status()). With a call key, keep the call index
-- alive as long as the records it lists.
-- prev: the status of the record being replaced, read from it by the caller; the id is
-- then taken out of that status set alone (NEW: a record that did not exist; nil: out
-- of every other one).
local function store_record(id, json, status, ttl_ms, now, call_key, prev)
  local key = prefix .. 'inv:' .. id
  local score = NEVER
  local expires = math.huge
  if FINAL[status] and ttl_ms ~= '' then
    redis.call('SET', key, json, 'PX', ttl_ms)
    local expiry = expiries[ttl_ms]
    if not expiry then
      local at = now + tonumber(ttl_ms) / 1000
      expiry = {at, string.format('%.17g', at)}
      expiries[ttl_ms] = expiry
    end
    expires, score = expiry[1], expiry[2]
  else
    redis.call('SET', key, json)
  end
  note_status(id, status, score, prev)
  if FINAL[status] then
    settled[id] = expires
    fresh[id] = nil
  else
    fresh[id] = true
    settled[id] = nil
  end
  if call_key then
    local index = prefix .. 'call:' .. call_key
    if FINAL[status] then
      settle_call_index(index, now)
    else
      redis.call('PERSIST', index)
    end
  end
end

local function release_dedup(dedup, id)
  if dedup ~= '' then
    local dedup_key = prefix .. 'dedup:' .. dedup
    if redis.call('GET', dedup_key) == id then
      redis.call('DEL', dedup_key)
    end
  end
end

local function push(queue, id)
  local stream = prefix .. 'q:' .. queue
  if not stream_exists(stream) then
    -- From id 0: a group created at '$' would skip the entry added next.
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
    streams[stream] = true
  end
  redis.call('XADD', stream, '*', 'id', id)
end

-- Whether the receipt (entry id + delivery count) names the entry's current delivery.
local function held(stream, entry, count)
  if not stream_exists(stream) then
    return false
  end
  local pending = redis.call('XPENDING', stream, GROUP, entry, entry, '1')
  return #pending == 1 and tonumber(pending[1][4]) == tonumber(count)
end

-- Acknowledge entries and drop them from their streams and in-flight sets, three
-- commands per queue: queue -> entry ids.
local function forget_all(by_queue)
  for queue, entries in pairs(by_queue) do
    local stream = prefix .. 'q:' .. queue
    call_with('XACK', stream, entries, GROUP)
    call_with('XDEL', stream, entries)
    call_with('ZREM', prefix .. 'inflight:' .. queue, entries)
  end
end

local function forget(queue, entry)
  forget_all({[queue] = {entry}})
end
"""
)

# ARGV: prefix, ttl_ms, then per record: id, queue, json, status, dedup key, not_before
# ('' for none), call key. Returns per record '' (stored) or the JSON of the record
# returned instead.
_SUBMIT: Final = (
    _PRELUDE
    + """
local ttl_ms = ARGV[2]
local now = server_time()
local out = {}
-- Call index scores, in submission order: one INCRBY reserves them for the batch.
local seq = redis.call('INCRBY', prefix .. 'seq', (#ARGV - 2) / 7) - (#ARGV - 2) / 7
for base = 3, #ARGV, 7 do
  local id, queue, json = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local status, dedup, not_before = ARGV[base + 3], ARGV[base + 4], ARGV[base + 5]
  local call_key = ARGV[base + 6]
  -- The same id again (a re-sent script, a retried submit): change nothing.
  local found = redis.call('GET', prefix .. 'inv:' .. id)
  if not found and dedup ~= '' then
    local dedup_key = prefix .. 'dedup:' .. dedup
    local holder = redis.call('GET', dedup_key)
    if holder and is_live(holder) then
      found = redis.call('GET', prefix .. 'inv:' .. holder)
    end
    if not found then
      redis.call('SET', dedup_key, id)
    end
  end
  if found then
    out[#out + 1] = found
  else
    local index = prefix .. 'call:' .. call_key
    local gone = {}
    local listed = redis.call('ZRANGE', index, '0', CALL_TRIM_RANGE)
    for _, old in ipairs(listed) do
      if redis.call('EXISTS', prefix .. 'inv:' .. old) == 0 then
        gone[#gone + 1] = old
      end
    end
    if #gone > 0 then
      redis.call('ZREM', index, unpack(gone))
    end
    seq = seq + 1
    redis.call('ZADD', index, string.format('%d', seq), id)
    if #listed > 0 then
      redis.call('PERSIST', index)  -- a new index has no expiry to drop
    end
    store_record(id, json, status, ttl_ms, now, nil, NEW)
    if not_before ~= '' and tonumber(not_before) > now then
      redis.call('ZADD', prefix .. 'delayed:' .. queue, not_before, id)
    else
      push(queue, id)
    end
    out[#out + 1] = ''
  end
end
flush_status()
return out
"""
)

# ARGV: prefix, ttl_ms, id, json, status, dedup key (''), call key. Returns 0 if unknown.
_UPDATE: Final = (
    _PRELUDE
    + """
local ttl_ms, id, json, status, dedup = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local call_key = ARGV[7]
if redis.call('EXISTS', prefix .. 'inv:' .. id) == 0 then
  return 0
end
local now = server_time()
store_record(id, json, status, ttl_ms, now, call_key)
if FINAL[status] then
  release_dedup(dedup, id)
  -- Drop ids whose records have expired, so the status sets stay bounded.
  redis.call('ZREMRANGEBYSCORE', prefix .. 'status:' .. status, '-inf', now)
  redis.call('PUBLISH', prefix .. 'final', id)
end
flush_status()
return 1
"""
)

# ARGV: prefix, consumer, max items, visibility timeout (s), consumer as a JSON string,
# queues... Returns {deliveries} with deliveries flat (queue, entry id, invocation id,
# count, record JSON or nil), or, when nothing was deliverable, {{}, last entry id per
# queue, seconds until the next delayed or in-flight entry is due ('' if none)}.
_RECEIVE: Final = (
    _PRELUDE
    + f"""
local consumer = ARGV[2]
local remaining = tonumber(ARGV[3])
local timeout = tonumber(ARGV[4])
local worker_json = ARGV[5]
local worker = cjson.decode(worker_json)
local now = server_time()
local out = {{}}
-- Made once: formatting a number costs more than the rest of a claim's string work.
local claim_tail = string.format(',"worker_id":%s,"updated_at":%.6f', worker_json, now)
-- Deadlines are whole milliseconds: a small sorted set (a listpack, where a new entry
-- compares its way past the others) compares integers as they are, where it would
-- parse a text such as '1796000000.1234567' again at each comparison.
local now_ms = string.format('%d', math.floor(now * 1000))
local deadline = string.format('%d', math.ceil((now + timeout) * 1000))

-- Mark a claimed invocation's record RUNNING (attempt + 1, this worker, now) and
-- return it; a final or unreadable record is returned as it is, a missing one as false.
-- The record is read with cjson (C, fast); its members are then rewritten in place.
local function claim_record(id)
  local json = redis.call('GET', prefix .. 'inv:' .. id)
  if not json then
    return false
  end
  local status, attempt, _, _, rest = record_head(json)
  if status then
    if not KNOWN[status] or FINAL[status] then
      return json
    end
    local claimed = '{{"status":"running","attempt":' ..
      string.format('%d', tonumber(attempt) + 1) .. claim_tail .. string.sub(json, rest)
    store_record(id, claimed, 'running', '', now, nil, status)
    return claimed
  end
  if not string.find(json, '^%s*{{') then
    return json
  end
  local ok, doc = pcall(cjson.decode, json)
  if not ok or type(doc) ~= 'table' then
    return json
  end
  local status = doc['status']
  if status == nil then
    status = 'pending'
  elseif type(status) ~= 'string' then
    return json
  end
  if not KNOWN[status] or FINAL[status] then
    return json
  end
  local attempt = doc['attempt']
  if attempt == nil then
    attempt = 0
  elseif type(attempt) ~= 'number' or attempt ~= math.floor(attempt) then
    return json
  end
  -- {{key, JSON text, decoded value}} for each member that changes.
  local changes = {{}}
  if status ~= 'running' then
    changes[#changes + 1] = {{'status', '"running"', 'running'}}
  end
  changes[#changes + 1] = {{'attempt', string.format('%d', attempt + 1), attempt + 1}}
  if doc['worker_id'] ~= worker then
    changes[#changes + 1] = {{'worker_id', worker_json, worker}}
  end
  local updated = string.format('%.6f', now)
  if doc['updated_at'] ~= tonumber(updated) then
    changes[#changes + 1] = {{'updated_at', updated, tonumber(updated)}}
  end
  local claimed = rewrite_members_fast(json, changes)
  if not claimed then
    local spans, close = members(json)
    if not spans then
      return json
    end
    claimed = with_members(json, spans, close, changes)
  end
  store_record(id, claimed, 'running', '', now, nil, status)
  return claimed
end

-- Visibility deadlines of the entries delivered from the current queue (score, entry
-- pairs), added with one ZADD when the queue is done.
local deadlines = {{}}

local function deliver(queue, entry, fields, count)
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then
      local id = fields[i + 1]
      deadlines[#deadlines + 1] = deadline
      deadlines[#deadlines + 1] = entry
      out[#out + 1] = queue
      out[#out + 1] = entry
      out[#out + 1] = id
      out[#out + 1] = count
      out[#out + 1] = claim_record(id)
      remaining = remaining - 1
      return
    end
  end
  -- Not an acall entry: never hand it out again.
  forget(queue, entry)
end

for i = 6, #ARGV do
  local queue = ARGV[i]
  local stream = prefix .. 'q:' .. queue
  local delayed = prefix .. 'delayed:' .. queue
  local inflight = prefix .. 'inflight:' .. queue
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, {_MOVE_DUE})
  if #due > 0 then
    for _, id in ipairs(due) do
      push(queue, id)
    end
    redis.call('ZREM', delayed, unpack(due))
  end
  if not stream_exists(stream) then
    redis.call('DEL', inflight)
  else
    -- Entries whose visibility timeout is over (or that were released) come first.
    if remaining > 0 then
      local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', now_ms, 'LIMIT', 0, remaining)
      for _, entry in ipairs(expired) do
        local claimed = redis.call('XCLAIM', stream, GROUP, consumer, 0, entry)
        if claimed[1] and claimed[1][2] then
          local pending = redis.call('XPENDING', stream, GROUP, entry, entry, '1')
          deliver(queue, entry, claimed[1][2], pending[1][4])
        else
          redis.call('ZREM', inflight, entry)  -- deleted from the stream meanwhile
        end
      end
    end
    if remaining > 0 then
      local read = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', remaining,
        'STREAMS', stream, '>')
      if read then
        for _, item in ipairs(read[1][2]) do
          deliver(queue, item[1], item[2], 1)
        end
      end
    end
    if #deadlines > 0 then
      call_with('ZADD', inflight, deadlines)
      deadlines = {{}}
    end
  end
end
flush_status()
if #out > 0 then
  return {{out}}
end
local last_ids = {{}}
local next_due = nil
for i = 6, #ARGV do
  local queue = ARGV[i]
  local last = redis.call('XREVRANGE', prefix .. 'q:' .. queue, '+', '-', 'COUNT', 1)
  last_ids[#last_ids + 1] = last[1] and last[1][1] or '0-0'
  -- (Delays are in seconds, visibility deadlines in milliseconds.)
  local scales = {{
    [prefix .. 'delayed:' .. queue] = 1,
    [prefix .. 'inflight:' .. queue] = 1000,
  }}
  for key, scale in pairs(scales) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      local score = tonumber(first[2]) / scale
      if next_due == nil or score < next_due then
        next_due = score
      end
    end
  end
end
local next_in = ''
if next_due ~= nil then
  next_in = string.format('%.6f', next_due - now)
end
return {{out, last_ids, next_in}}
"""
)

# ARGV: prefix, ttl_ms, then per outcome: queue, entry id, delivery count ('' and '' for
# a receipt this broker did not issue), id, json, status, dedup key (''), call key.
# Returns how many records were stored.
_FINISH: Final = (
    _PRELUDE
    + """
local ttl_ms = ARGV[2]
local now = server_time()
local stored = 0
local calls = {}
local seen = {}
local finished = {}
local done = {}  -- queue -> entries to acknowledge
for base = 3, #ARGV, 8 do
  local queue, entry, count = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local id, json, status = ARGV[base + 3], ARGV[base + 4], ARGV[base + 5]
  local dedup, call_key = ARGV[base + 6], ARGV[base + 7]
  local current = redis.call('GET', prefix .. 'inv:' .. id)
  -- The first outcome wins; an unreadable record is replaced.
  local prev = current and record_status(current)
  if current and not FINAL[prev or ''] then
    store_record(id, json, status, ttl_ms, now, nil, prev)
    release_dedup(dedup, id)
    finished[#finished + 1] = id
    stored = stored + 1
    if not seen[call_key] then
      seen[call_key] = true
      calls[#calls + 1] = call_key
    end
  end
  if entry ~= '' and held(prefix .. 'q:' .. queue, entry, count) then
    append(done, queue, entry)
  end
end
forget_all(done)
flush_status()
-- Each call's index once, after all of the batch is stored.
for _, call_key in ipairs(calls) do
  settle_call_index(prefix .. 'call:' .. call_key, now)
end
if stored > 0 then
  -- One message for the batch (ids separated by spaces): each message costs every
  -- subscriber a read and a parse.
  redis.call('PUBLISH', prefix .. 'final', table.concat(finished, ' '))
  -- Drop ids whose records have expired, so the status sets stay bounded.
  for _, s in ipairs(FINALS) do
    redis.call('ZREMRANGEBYSCORE', prefix .. 'status:' .. s, '-inf', now)
  end
end
return stored
"""
)

# ARGV: prefix, call key, limit. Returns flat (id, record JSON) pairs, oldest first;
# ids whose record has expired are removed from the index on the way.
_FIND_BY_CALL: Final = (
    _PRELUDE
    + """
local index = prefix .. 'call:' .. ARGV[2]
local limit = tonumber(ARGV[3])
local out = {}
local found = 0
local start = 0
while found < limit do
  local ids = redis.call('ZRANGE', index, start, start + 99)
  if #ids == 0 then
    break
  end
  local gone = {}
  for _, id in ipairs(ids) do
    local json = redis.call('GET', prefix .. 'inv:' .. id)
    if not json then
      gone[#gone + 1] = id
    elseif found < limit then
      out[#out + 1] = id
      out[#out + 1] = json
      found = found + 1
    end
  end
  if #gone > 0 then
    redis.call('ZREM', index, unpack(gone))
  end
  start = start + #ids - #gone
end
return out
"""
)

# ARGV: prefix, queue, entry id, delivery count. Returns 1 if acknowledged.
_ACK: Final = (
    _PRELUDE
    + """
local queue, entry, count = ARGV[2], ARGV[3], ARGV[4]
local stream = prefix .. 'q:' .. queue
if not held(stream, entry, count) then
  return 0
end
forget(queue, entry)
return 1
"""
)

# ARGV: prefix, new deadline offset (s), then per delivery: queue, entry id, delivery
# count. Returns how many receipts were current.
_SET_DEADLINE: Final = (
    _PRELUDE
    + """
local score = string.format('%d', math.ceil((server_time() + tonumber(ARGV[2])) * 1000))
local changed = 0
for base = 3, #ARGV, 3 do
  local queue, entry, count = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  if held(prefix .. 'q:' .. queue, entry, count) then
    redis.call('ZADD', prefix .. 'inflight:' .. queue, score, entry)
    changed = changed + 1
  end
end
return changed
"""
)

# ARGV: prefix, then per delivery: queue, entry id, delivery count, id, the record
# waiting again ('' to leave the record) and its status. Returns how many receipts were
# current.
_RELEASE: Final = (
    _PRELUDE
    + """
local now = nil
local released = 0
for base = 2, #ARGV, 6 do
  local queue, entry, count = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local id, json, status = ARGV[base + 3], ARGV[base + 4], ARGV[base + 5]
  if held(prefix .. 'q:' .. queue, entry, count) then
    if json ~= '' then
      local current = redis.call('GET', prefix .. 'inv:' .. id)
      if current and record_status(current) == 'running' then
        now = now or server_time()
        store_record(id, json, status, '', now, nil, 'running')
      end
    end
    -- Deadline 0: due at once, and first in line (ahead of newer entries).
    redis.call('ZADD', prefix .. 'inflight:' .. queue, '0', entry)
    released = released + 1
  end
end
flush_status()
return released
"""
)

# ARGV: prefix, ttl_ms, queue, entry id, delivery count, id, json, status, delay (s),
# call key. Returns 1 if the receipt was current (and the retry happened).
_RETRY: Final = (
    _PRELUDE
    + """
local ttl_ms, queue, entry, count = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local id, json, status, delay = ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local call_key = ARGV[10]
local stream = prefix .. 'q:' .. queue
if not held(stream, entry, count) then
  return 0
end
local now = server_time()
store_record(id, json, status, ttl_ms, now, call_key)
forget(queue, entry)
if delay > 0 then
  redis.call('ZADD', prefix .. 'delayed:' .. queue, now + delay, id)
else
  push(queue, id)
end
flush_status()
return 1
"""
)

# ARGV: prefix. Returns the number of invocations per status, in _STATUSES order.
_COUNTS: Final = (
    _PRELUDE
    + """
local now = server_time()
local out = {}
for i, s in ipairs(STATUSES) do
  local key = prefix .. 'status:' .. s
  if FINAL[s] then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  end
  out[i] = redis.call('ZCARD', key)
end
return out
"""
)


def _parse_receipt(delivery: Delivery) -> tuple[str, str] | None:
    """The (entry id, delivery count) of a receipt this broker issued, else ``None``."""
    queue, _, rest = delivery.receipt.partition("/")
    entry, _, count = rest.partition("/")
    if queue != delivery.queue or _ENTRY_ID_RE.fullmatch(entry) is None or not count.isdigit():
        return None
    return entry, count


class RedisBroker(BrokerBase):
    """A broker in a Redis database, shared by every process that reaches the server.

    :param host: server host name or address.
    :param port: server port.
    :param db: database number.
    :param username: ACL user name, if any.
    :param password: password, if any (never shown in :attr:`url` or messages).
    :param ssl: connect with TLS (``rediss://``).
    :param prefix: prepended to every key in Redis, so several apps can share a DB
        (default ``acall:b:``).
    :param record_ttl: seconds a finished record is kept (``None``: forever).
    :param retries: reconnect attempts for one operation before it fails with
        :class:`~acall.errors.BrokerUnavailableError`.
    :param socket_timeout: seconds to wait for one reply.
    :param socket_connect_timeout: seconds to wait for a TCP connection.
    :param max_connections: pool size; further concurrent operations wait for a slot
        (each waiting :meth:`receive` and each :meth:`watch_final` holds one).
    :param ssl_ca_certs: CA bundle to verify the server against (``rediss://``).
    :param ssl_cert_reqs: ``"required"`` (default), ``"optional"`` or ``"none"``.
    :param url: what :attr:`url` shows (redacted); built from the parts when omitted.
    :ivar prefix: the key prefix in Redis.
    :ivar record_ttl: see the parameter.
    :ivar host: server host.
    :ivar port: server port.
    :ivar db: database number.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        db: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        prefix: str = DEFAULT_PREFIX,
        record_ttl: float | None = DEFAULT_RECORD_TTL,
        retries: int = 5,
        socket_timeout: float = 30.0,
        socket_connect_timeout: float = 5.0,
        max_connections: int = 64,
        ssl_ca_certs: str | None = None,
        ssl_cert_reqs: str = "required",
        url: str | None = None,
    ) -> None:
        check_settings(
            prefix=prefix,
            default_prefix=DEFAULT_PREFIX,
            port=port,
            db=db,
            retries=retries,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            ssl_cert_reqs=ssl_cert_reqs,
        )
        if max_connections < 2:
            # With one, a worker's waiting receive() would hold it and no outcome could
            # ever be recorded (nor a result watched beside a submission).
            raise ConfigurationError(
                "a Redis broker needs max_connections >= 2 (a waiting receive() and a "
                f"result watcher each hold a connection while they wait), got {max_connections}"
            )
        super().__init__(
            shown_url(
                url, ssl=ssl, username=username, password=password, host=host, port=port, db=db
            )
        )
        self.prefix = prefix
        self.record_ttl = validate_ttl(record_ttl, what="record_ttl")
        self.host = host
        self.port = port
        self.db = db
        self._ttl_ms = "" if self.record_ttl is None else str(math.ceil(self.record_ttl * 1000))
        # A blocking read must end well before the client gives up on the socket.
        self._max_block = min(_MAX_BLOCK, socket_timeout / 2)
        # Dropped connections are re-dialled and the command re-sent: the scripts are
        # written for that (see the module docstring).
        self._redis = RedisConnection(
            kind="broker",
            url=self.url,
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            ssl=ssl,
            ssl_ca_certs=ssl_ca_certs,
            ssl_cert_reqs=ssl_cert_reqs,
            retries=retries,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            max_connections=max_connections,
            decode_responses=True,
            error=BrokerError,
            unavailable=BrokerUnavailableError,
            small_commands=True,
        )
        self._client: Redis = self._redis.client
        self._submit = self._client.register_script(_SUBMIT)
        self._update_script = self._client.register_script(_UPDATE)
        self._receive_script = self._client.register_script(_RECEIVE)
        self._finish_script = self._client.register_script(_FINISH)
        self._find_script = self._client.register_script(_FIND_BY_CALL)
        self._ack_script = self._client.register_script(_ACK)
        self._deadline_script = self._client.register_script(_SET_DEADLINE)
        self._release_script = self._client.register_script(_RELEASE)
        self._retry_script = self._client.register_script(_RETRY)
        self._counts_script = self._client.register_script(_COUNTS)

    @classmethod
    def from_url(cls, url: str, **options: object) -> RedisBroker:
        """Open ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``).

        Query options: ``prefix``, ``record_ttl``, ``retries``, ``socket_timeout``,
        ``socket_connect_timeout``, ``max_connections``, ``ssl_ca_certs``,
        ``ssl_cert_reqs``; keyword *options* override them.
        """
        converters: dict[str, Callable[[str], object]] = {
            **CONNECTION_OPTIONS,
            "record_ttl": float,
        }
        arguments = url_arguments(url, options, converters, _URL_FORMS, what="broker")
        return cls(**arguments)  # type: ignore[arg-type]

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Await *operation*, turning every redis-py failure into an acall error.

        Every call is one request: a command, a script, or a pipeline of them.
        """
        return await self._redis.call(what, operation)

    def _receipt_args(self, deliveries: Sequence[Delivery]) -> list[str]:
        """Flat (queue, entry id, count) triples of the receipts this broker issued."""
        args: list[str] = []
        for delivery in deliveries:
            parsed = _parse_receipt(delivery)
            if parsed is not None:
                args += [delivery.queue, *parsed]
        return args

    # -- backend hooks ------------------------------------------------------------------------

    async def _submit_many(self, records: list[InvocationRecord]) -> list[InvocationRecord]:
        replies: list[str] = []
        for start in range(0, len(records), _SUBMIT_CHUNK):
            args: list[str] = [self.prefix, self._ttl_ms]
            for record in records[start : start + _SUBMIT_CHUNK]:
                args += [
                    record.invocation_id,
                    record.queue,
                    self._encode(record),
                    record.status.value,
                    record.dedup_key or "",
                    "" if record.not_before is None else repr(record.not_before),
                    record.call_id.key,
                ]
            replies += await self._call(
                f"submit {len(records)} invocations", functools.partial(self._submit, args=args)
            )
        return [
            record if not reply else self._decode(reply, record.invocation_id)
            for record, reply in zip(records, replies, strict=True)
        ]

    async def _get_many(self, invocation_ids: list[str]) -> list[InvocationRecord | None]:
        return await self._read(invocation_ids, self._decode)

    async def _get_final_many(
        self, invocation_ids: list[str]
    ) -> list[InvocationRecord | InvocationStatus | None]:
        return await self._read(invocation_ids, self._decode_unless_live)

    async def _read(
        self, invocation_ids: list[str], decode: Callable[[bytes | str, str], _Read]
    ) -> list[_Read | None]:
        """``decode(record text, id)`` for each of *invocation_ids* (one MGET), ``None``
        if unknown."""
        keys = [f"{self.prefix}inv:{invocation_id}" for invocation_id in invocation_ids]
        texts = await self._call(f"read {len(keys)} records", lambda: self._client.mget(keys))
        return [
            None if text is None else decode(text, invocation_id)
            for invocation_id, text in zip(invocation_ids, texts, strict=True)
        ]

    async def _update(self, record: InvocationRecord) -> bool:
        args = [
            self.prefix,
            self._ttl_ms,
            record.invocation_id,
            self._encode(record),
            record.status.value,
            record.dedup_key or "",
            record.call_id.key,
        ]
        found = await self._call(
            f"update invocation {record.invocation_id}",
            lambda: self._update_script(args=args),
        )
        return bool(found)

    async def _receive(
        self,
        queues: list[str],
        max_items: int,
        consumer: str,
        visibility_timeout: float,
        wait: float,
    ) -> list[Delivery]:
        worker_json = json.dumps(consumer, ensure_ascii=False)
        args: list[str | int] = [self.prefix, consumer, max_items, repr(visibility_timeout)]
        args += [worker_json, *queues]
        streams = [f"{self.prefix}q:{queue}" for queue in queues]
        what = f"receive from {', '.join(queues)}"
        deadline = time.monotonic() + wait
        while True:
            reply = await self._call(what, lambda: self._receive_script(args=args))
            flat = reply[0]
            if flat:
                return [
                    make_delivery(
                        invocation_id,
                        queue,
                        f"{queue}/{entry}/{count}",
                        int(count),
                        None if text is None else self._decode_claimed(text, invocation_id),
                    )
                    for queue, entry, invocation_id, count, text in zip(
                        flat[0::5], flat[1::5], flat[2::5], flat[3::5], flat[4::5], strict=True
                    )
                ]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            block = min(remaining, self._max_block)
            if reply[2]:
                block = min(block, float(reply[2]))
            if block < 0.001:
                await anyio.sleep(0.001)  # BLOCK 0 would mean "forever"
                continue
            # XREAD (outside the group) claims nothing: it only returns early when an
            # entry newer than the last one seen by the script arrives.
            after: dict[KeyT, StreamIdT] = dict(zip(streams, reply[1], strict=True))
            await self._call(
                what, functools.partial(self._client.xread, after, 1, int(block * 1000))
            )

    async def _finish(self, outcomes: list[tuple[Delivery, InvocationRecord]]) -> None:
        batches: list[list[str]] = []
        for start in range(0, len(outcomes), _FINISH_CHUNK):
            args = [self.prefix, self._ttl_ms]
            for delivery, record in outcomes[start : start + _FINISH_CHUNK]:
                entry, count = _parse_receipt(delivery) or ("", "")
                args += [
                    delivery.queue,
                    entry,
                    count,
                    record.invocation_id,
                    self._encode(record),
                    record.status.value,
                    record.dedup_key or "",
                    record.call_id.key,
                ]
            batches.append(args)
        what = f"finish {len(outcomes)} invocations"
        if len(batches) == 1:
            await self._call(what, functools.partial(self._finish_script, args=batches[0]))
            return

        async def operation() -> list[Any]:
            # One round trip; each script is atomic and idempotent on its own.
            async with self._client.pipeline(transaction=False) as pipe:
                for args in batches:
                    await self._finish_script(args=args, client=pipe)
                return await pipe.execute()

        await self._call(what, operation)

    async def _find_by_call(self, call_key: str, limit: int) -> list[InvocationRecord]:
        args: list[str | int] = [self.prefix, call_key, limit]
        flat = await self._call(
            f"find invocations of call {call_key!r}", lambda: self._find_script(args=args)
        )
        return [
            self._decode(text, invocation_id)
            for invocation_id, text in zip(flat[0::2], flat[1::2], strict=True)
        ]

    async def _ack(self, delivery: Delivery) -> None:
        parsed = _parse_receipt(delivery)
        if parsed is None:
            return
        args = [self.prefix, delivery.queue, *parsed]
        await self._call(
            f"acknowledge invocation {delivery.invocation_id}",
            lambda: self._ack_script(args=args),
        )

    async def _extend(self, deliveries: list[Delivery], visibility_timeout: float) -> None:
        receipts = self._receipt_args(deliveries)
        if receipts:
            args = [self.prefix, repr(visibility_timeout), *receipts]
            await self._call(
                f"extend {len(deliveries)} deliveries", lambda: self._deadline_script(args=args)
            )

    async def _retry(self, delivery: Delivery, record: InvocationRecord, delay: float) -> None:
        parsed = _parse_receipt(delivery)
        if parsed is None:
            return
        args = [
            self.prefix,
            self._ttl_ms,
            delivery.queue,
            *parsed,
            record.invocation_id,
            self._encode(record),
            record.status.value,
            repr(delay),
            record.call_id.key,
        ]
        await self._call(
            f"retry invocation {delivery.invocation_id}", lambda: self._retry_script(args=args)
        )

    async def _release(
        self, deliveries: list[Delivery], records: list[InvocationRecord | None]
    ) -> None:
        args = [self.prefix]
        for delivery, record in zip(deliveries, records, strict=True):
            parsed = _parse_receipt(delivery)
            if parsed is not None:
                args += [delivery.queue, *parsed, delivery.invocation_id]
                args += ["", ""] if record is None else [self._encode(record), record.status.value]
        if len(args) > 1:
            await self._call(
                f"release {len(deliveries)} deliveries", lambda: self._release_script(args=args)
            )

    async def _watch_final(self) -> AsyncGenerator[set[str], None]:
        what = "watch for finished invocations"
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call(what, lambda: pubsub.subscribe(f"{self.prefix}final"))
            yield set()  # subscribed: see Broker.watch_final
            next_tick = time.monotonic() + _TICK
            while not self._closed:
                ids: set[str] = set()
                timeout = max(0.0, next_tick - time.monotonic())
                # Wait for one message, then take what else has already arrived (up to a
                # bound, so a busy channel still yields batches).
                while len(ids) < _WATCH_BATCH:
                    message = await self._call(
                        what, functools.partial(pubsub.get_message, timeout=timeout)
                    )
                    if message is None:
                        break
                    if message["type"] == "message":
                        # One message per finished batch: ids separated by spaces.
                        ids.update(message["data"].split())
                    timeout = 0.0
                if ids or time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + _TICK
                    yield ids
        except BrokerError:
            # close() may win the race against a read already under way: end quietly.
            if not self._closed:
                raise
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    async def _scan_records(self, batch_size: int) -> AsyncIterator[list[ScannedRecord]]:
        head = f"{self.prefix}inv:"
        # Prefixes are made of key characters, none of which MATCH treats specially.
        pattern = head + "*"
        # No set of the ids seen so far: it would hold every id of the database (memory
        # growing with the records kept). SCAN returns a key twice only when the key
        # space shrinks during the scan, which Broker.scan_records allows.
        cursor = 0
        while True:

            async def step(cursor: int = cursor) -> tuple[int, list[Any]]:
                reply = await self._client.scan(cursor, match=pattern, count=batch_size)
                return int(reply[0]), list(reply[1])

            cursor, names = await self._call("scan records", step)
            ids = [str(name)[len(head) :] for name in names]
            ids = [i for i in ids if KEY_PATTERN.fullmatch(i) is not None]
            for start in range(0, len(ids), batch_size):
                part = ids[start : start + batch_size]
                keys = [head + invocation_id for invocation_id in part]

                async def read(keys: list[str] = keys) -> list[Any]:
                    return list(await self._client.mget(keys))

                texts = await self._call(f"read {len(keys)} records", read)
                yield [
                    self._decode_scanned(text, invocation_id)
                    for invocation_id, text in zip(part, texts, strict=True)
                    if text is not None  # expired since SCAN saw it
                ]
            if cursor == 0:
                return

    async def _counts(self) -> dict[InvocationStatus, int]:
        numbers = await self._call(
            "count invocations", lambda: self._counts_script(args=[self.prefix])
        )
        return {
            InvocationStatus(value): int(count)
            for value, count in zip(_STATUSES, numbers, strict=True)
        }

    async def _pending_count(self, queue: str) -> int:
        async def operation() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xlen(f"{self.prefix}q:{queue}")
                pipe.zcard(f"{self.prefix}delayed:{queue}")
                return await pipe.execute()

        counts = await self._call(f"count entries of queue {queue!r}", operation)
        return sum(int(count) for count in counts)

    async def _close(self) -> None:
        await self._redis.close()
