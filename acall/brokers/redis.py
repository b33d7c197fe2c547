"""A broker on Redis Streams, through ``redis.asyncio`` (redis-py >= 5).

Key layout (``p`` is the prefix, default ``acall:``)::

    p inv:{id}          string  the InvocationRecord as DTOCodec JSON; finished ones
                                expire after record_ttl, pending ones never
    p dedup:{key}       string  dedup key -> id of the invocation holding it
    p status:{status}   zset    invocation ids by status (score: expiry time, +inf for
                                records that do not expire), for counts()
    p q:{queue}         stream  queue entries {"id": invocation id}; consumer group
                                "acall-workers"; an entry is XACKed and XDELed on ack
    p inflight:{queue}  zset    stream entry id -> time its visibility timeout ends
    p delayed:{queue}   zset    invocation id -> time it becomes deliverable
    p final             pub/sub channel: ids of invocations that became final

Every operation that reads and writes is one Lua script, so it is atomic. redis-py
re-sends a command after a dropped connection, so the scripts are idempotent (submit
and update by invocation id; ack, extend, release and retry by receipt), except
receive: one re-sent after a lost reply claims entries again, and the ones the lost
reply carried are delivered once more when their visibility timeout ends, which
at-least-once delivery allows.
Times inside scripts come from the server's clock (``TIME``), the one clock every
client shares; only a record's ``not_before`` is a client's wall-clock time.

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
import math
import re
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import anyio
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.typing import KeyT, StreamIdT

from acall.brokers._common import DEFAULT_RECORD_TTL, BrokerBase
from acall.brokers.base import Delivery
from acall.dto import InvocationRecord, InvocationStatus
from acall.errors import BrokerError, BrokerUnavailableError, ConfigurationError
from acall.stores.base import store_options, validate_ttl
from acall.stores.redis import redact_url

__all__ = ["CONSUMER_GROUP", "RedisBroker"]

_T = TypeVar("_T")

#: The consumer group every acall worker reads the queue streams with.
CONSUMER_GROUP: Final = "acall-workers"

_URL_FORMS: Final = (
    "redis://[[user]:password@]host[:port][/db][?prefix=acall:&record_ttl=SECONDS] "
    "(rediss:// for TLS)"
)
_PREFIX_RE: Final = re.compile(r"[!-~]{0,200}")  # printable ASCII, no spaces
_ENTRY_ID_RE: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_DEFAULT_PORT: Final = 6379
_SUBMIT_CHUNK: Final = 500  # records per script call: bounds how long one call holds Redis
_MOVE_DUE: Final = 1000  # delayed entries moved to a stream per receive and queue
# Longest blocking read in receive(): entries released or timing out meanwhile are
# noticed after at most this long (new submissions wake the read at once).
_MAX_BLOCK: Final = 0.5
_TICK: Final = 1.0
_WATCH_BATCH: Final = 1000

_STATUSES: Final = [status.value for status in InvocationStatus]


def _lua_list(values: Sequence[str]) -> str:
    return "{" + ", ".join(f"'{value}'" for value in values) + "}"


_PRELUDE: Final = f"""
local prefix = ARGV[1]
local GROUP = '{CONSUMER_GROUP}'
local STATUSES = {_lua_list(_STATUSES)}
local LIVE = {_lua_list([s.value for s in InvocationStatus if not s.is_final])}
local FINAL = {{}}
for _, s in ipairs({_lua_list([s.value for s in InvocationStatus if s.is_final])}) do
  FINAL[s] = true
end

local function server_time()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Write a record and file it under its status (ttl_ms: '' when records never expire).
local function store_record(id, json, status, ttl_ms, now)
  local key = prefix .. 'inv:' .. id
  local score = '+inf'
  if FINAL[status] and ttl_ms ~= '' then
    redis.call('SET', key, json, 'PX', ttl_ms)
    score = now + tonumber(ttl_ms) / 1000
  else
    redis.call('SET', key, json)
  end
  for _, s in ipairs(STATUSES) do
    if s ~= status then
      redis.call('ZREM', prefix .. 'status:' .. s, id)
    end
  end
  redis.call('ZADD', prefix .. 'status:' .. status, score, id)
end

local function is_live(id)
  for _, s in ipairs(LIVE) do
    if redis.call('ZSCORE', prefix .. 'status:' .. s, id) then
      return true
    end
  end
  return false
end

local function push(queue, id)
  local stream = prefix .. 'q:' .. queue
  if redis.call('EXISTS', stream) == 0 then
    -- From id 0: a group created at '$' would skip the entry added next.
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
  end
  redis.call('XADD', stream, '*', 'id', id)
end

-- Whether the receipt (entry id + delivery count) names the entry's current delivery.
local function held(stream, entry, count)
  if redis.call('EXISTS', stream) == 0 then
    return false
  end
  local pending = redis.call('XPENDING', stream, GROUP, entry, entry, 1)
  return #pending == 1 and tonumber(pending[1][4]) == tonumber(count)
end

local function forget(queue, stream, entry)
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
  redis.call('ZREM', prefix .. 'inflight:' .. queue, entry)
end
"""

# ARGV: prefix, ttl_ms, then per record: id, queue, json, status, dedup key, not_before
# ('' for none). Returns per record '' (stored) or the JSON of the record returned instead.
_SUBMIT: Final = (
    _PRELUDE
    + """
local ttl_ms = ARGV[2]
local now = server_time()
local out = {}
for base = 3, #ARGV, 6 do
  local id, queue, json = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local status, dedup, not_before = ARGV[base + 3], ARGV[base + 4], ARGV[base + 5]
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
    store_record(id, json, status, ttl_ms, now)
    if not_before ~= '' and tonumber(not_before) > now then
      redis.call('ZADD', prefix .. 'delayed:' .. queue, not_before, id)
    else
      push(queue, id)
    end
    out[#out + 1] = ''
  end
end
return out
"""
)

# ARGV: prefix, ttl_ms, id, json, status, dedup key (''). Returns 0 if unknown.
_UPDATE: Final = (
    _PRELUDE
    + """
local ttl_ms, id, json, status, dedup = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', prefix .. 'inv:' .. id) == 0 then
  return 0
end
local now = server_time()
store_record(id, json, status, ttl_ms, now)
if FINAL[status] then
  if dedup ~= '' then
    local dedup_key = prefix .. 'dedup:' .. dedup
    if redis.call('GET', dedup_key) == id then
      redis.call('DEL', dedup_key)
    end
  end
  -- Drop ids whose records have expired, so the status sets stay bounded.
  redis.call('ZREMRANGEBYSCORE', prefix .. 'status:' .. status, '-inf', now)
  redis.call('PUBLISH', prefix .. 'final', id)
end
return 1
"""
)

# ARGV: prefix, consumer, max items, visibility timeout (s), queues...
# Returns {deliveries} with deliveries flat (queue, entry id, invocation id, count), or,
# when nothing was deliverable, {{}, last entry id per queue, seconds until the next
# delayed or in-flight entry is due ('' if none)}.
_RECEIVE: Final = (
    _PRELUDE
    + f"""
local consumer = ARGV[2]
local remaining = tonumber(ARGV[3])
local timeout = tonumber(ARGV[4])
local now = server_time()
local out = {{}}

local function deliver(queue, inflight, entry, fields, count)
  for i = 1, #fields, 2 do
    if fields[i] == 'id' then
      redis.call('ZADD', inflight, now + timeout, entry)
      out[#out + 1] = queue
      out[#out + 1] = entry
      out[#out + 1] = fields[i + 1]
      out[#out + 1] = count
      remaining = remaining - 1
      return
    end
  end
  -- Not an acall entry: never hand it out again.
  forget(queue, prefix .. 'q:' .. queue, entry)
end

for i = 5, #ARGV do
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
  if redis.call('EXISTS', stream) == 0 then
    redis.call('DEL', inflight)
  else
    -- Entries whose visibility timeout is over (or that were released) come first.
    if remaining > 0 then
      local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', now, 'LIMIT', 0, remaining)
      for _, entry in ipairs(expired) do
        local claimed = redis.call('XCLAIM', stream, GROUP, consumer, 0, entry)
        if claimed[1] and claimed[1][2] then
          local pending = redis.call('XPENDING', stream, GROUP, entry, entry, 1)
          deliver(queue, inflight, entry, claimed[1][2], pending[1][4])
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
          deliver(queue, inflight, item[1], item[2], 1)
        end
      end
    end
  end
end
if #out > 0 then
  return {{out}}
end
local last_ids = {{}}
local next_due = nil
for i = 5, #ARGV do
  local queue = ARGV[i]
  local last = redis.call('XREVRANGE', prefix .. 'q:' .. queue, '+', '-', 'COUNT', 1)
  last_ids[#last_ids + 1] = last[1] and last[1][1] or '0-0'
  for _, key in ipairs({{prefix .. 'delayed:' .. queue, prefix .. 'inflight:' .. queue}}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      local score = tonumber(first[2])
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

# ARGV: prefix, queue, entry id, delivery count. Returns 1 if acknowledged.
_ACK: Final = (
    _PRELUDE
    + """
local queue, entry, count = ARGV[2], ARGV[3], ARGV[4]
local stream = prefix .. 'q:' .. queue
if not held(stream, entry, count) then
  return 0
end
forget(queue, stream, entry)
return 1
"""
)

# ARGV: prefix, new deadline offset (s; '' to make entries due at once), then per
# delivery: queue, entry id, delivery count. Returns how many receipts were current.
_SET_DEADLINE: Final = (
    _PRELUDE
    + """
local score = 0
if ARGV[2] ~= '' then
  score = server_time() + tonumber(ARGV[2])
end
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

# ARGV: prefix, ttl_ms, queue, entry id, delivery count, id, json, status, delay (s).
# Returns 1 if the receipt was current (and the retry happened).
_RETRY: Final = (
    _PRELUDE
    + """
local ttl_ms, queue, entry, count = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local id, json, status, delay = ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local stream = prefix .. 'q:' .. queue
if not held(stream, entry, count) then
  return 0
end
local now = server_time()
store_record(id, json, status, ttl_ms, now)
forget(queue, stream, entry)
if delay > 0 then
  redis.call('ZADD', prefix .. 'delayed:' .. queue, now + delay, id)
else
  push(queue, id)
end
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
    :param prefix: prepended to every key in Redis, so several apps can share a DB.
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
        port: int = _DEFAULT_PORT,
        db: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        prefix: str = "acall:",
        record_ttl: float | None = DEFAULT_RECORD_TTL,
        retries: int = 5,
        socket_timeout: float = 30.0,
        socket_connect_timeout: float = 5.0,
        max_connections: int = 64,
        ssl_ca_certs: str | None = None,
        ssl_cert_reqs: str = "required",
        url: str | None = None,
    ) -> None:
        if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
            raise ConfigurationError(
                f"invalid Redis key prefix {prefix!r:.80}: use up to 200 printable ASCII "
                "characters without spaces (the default is 'acall:')"
            )
        for name, number, low in (
            ("port", port, 1),
            ("db", db, 0),
            ("retries", retries, 0),
            ("max_connections", max_connections, 1),
        ):
            if isinstance(number, bool) or not isinstance(number, int) or number < low:
                raise ConfigurationError(f"{name} must be an int >= {low}, got {number!r:.80}")
        for name, seconds in (
            ("socket_timeout", socket_timeout),
            ("socket_connect_timeout", socket_connect_timeout),
        ):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not math.isfinite(seconds)
                or seconds <= 0
            ):
                raise ConfigurationError(
                    f"{name} must be a positive number of seconds, got {seconds!r:.80}"
                )
        if ssl_cert_reqs not in ("required", "optional", "none"):
            raise ConfigurationError(
                f"ssl_cert_reqs must be 'required', 'optional' or 'none', got {ssl_cert_reqs!r}"
            )
        if url is None:
            scheme = "rediss" if ssl else "redis"
            auth = ""
            if username or password:
                auth = f"{username or ''}{':***' if password else ''}@"
            url = f"{scheme}://{auth}{host}:{port}/{db}"
        super().__init__(redact_url(url))
        self.prefix = prefix
        self.record_ttl = validate_ttl(record_ttl, what="record_ttl")
        self.host = host
        self.port = port
        self.db = db
        self._ttl_ms = "" if self.record_ttl is None else str(math.ceil(self.record_ttl * 1000))
        # A blocking read must end well before the client gives up on the socket.
        self._max_block = min(_MAX_BLOCK, socket_timeout / 2)

        connection_class: type[AbstractConnection] = Connection
        tls: dict[str, Any] = {}
        if ssl:
            connection_class = SSLConnection
            tls = {"ssl_ca_certs": ssl_ca_certs, "ssl_cert_reqs": ssl_cert_reqs}
        # A blocking pool makes a burst of concurrent operations wait for a connection
        # instead of failing with "Too many connections".
        self._pool = BlockingConnectionPool(
            max_connections=max_connections,
            connection_class=connection_class,
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            # Dropped connections are re-dialled with jittered backoff, and the command
            # re-sent (the scripts are written for that, see the module docstring).
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries),
            client_name="acall-broker",
            decode_responses=True,
            **tls,
        )
        self._client = Redis(connection_pool=self._pool)
        self._submit = self._client.register_script(_SUBMIT)
        self._update_script = self._client.register_script(_UPDATE)
        self._receive_script = self._client.register_script(_RECEIVE)
        self._ack_script = self._client.register_script(_ACK)
        self._deadline_script = self._client.register_script(_SET_DEADLINE)
        self._retry_script = self._client.register_script(_RETRY)
        self._counts_script = self._client.register_script(_COUNTS)

    @classmethod
    def from_url(cls, url: str, **options: object) -> RedisBroker:
        """Open ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``).

        Query options: ``prefix``, ``record_ttl``, ``retries``, ``socket_timeout``,
        ``socket_connect_timeout``, ``max_connections``, ``ssl_ca_certs``,
        ``ssl_cert_reqs``; keyword *options* override them.
        """
        shown = redact_url(url)
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(
                f"malformed Redis URL {shown!r} ({exc}); expected {_URL_FORMS}"
            ) from None
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"malformed Redis URL {shown!r}: expected {_URL_FORMS}")
        if not parts.hostname:
            raise ConfigurationError(
                f"Redis URL {shown!r} names no host; expected {_URL_FORMS}, "
                "for example redis://127.0.0.1:6379/0"
            )
        if parts.fragment:
            raise ConfigurationError(
                f"Redis URL {shown!r} has a '#' fragment; expected {_URL_FORMS}"
            )
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ConfigurationError(
                f"Redis URL {shown!r}: the path must be a database number like /0, "
                f"got {parts.path!r}"
            )
        merged = store_options(
            shown,
            parts.query,
            options,
            {
                "prefix": str,
                "record_ttl": float,
                "retries": int,
                "socket_timeout": float,
                "socket_connect_timeout": float,
                "max_connections": int,
                "ssl_ca_certs": str,
                "ssl_cert_reqs": str,
            },
        )
        base_url = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
        query = f"?{parts.query}" if parts.query else ""
        return cls(
            parts.hostname,
            port if port is not None else _DEFAULT_PORT,
            int(path) if path else 0,
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=urllib.parse.unquote(parts.password) if parts.password else None,
            ssl=parts.scheme == "rediss",
            url=base_url + query,
            **merged,  # type: ignore[arg-type]
        )

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Await *operation*, turning every redis-py failure into an acall error."""
        try:
            return await operation()
        except redis_errors.AuthenticationError as exc:
            raise BrokerUnavailableError(
                f"Redis broker {self.url} refused our credentials while trying to {what}: "
                f"{exc}; check the user name and password in the broker URL"
            ) from exc
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise BrokerUnavailableError(
                f"Redis broker {self.url} is unreachable (tried to {what}): {exc}; check that "
                f"redis-server is running and reachable at {self.host}:{self.port}"
            ) from exc
        except redis_errors.RedisError as exc:
            raise BrokerError(
                f"Redis broker {self.url} failed to {what}: {type(exc).__name__}: {exc}"
            ) from exc

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
                ]
            replies += await self._call(
                f"submit {len(records)} invocations", functools.partial(self._submit, args=args)
            )
        return [
            record if not reply else self._decode(reply, record.invocation_id)
            for record, reply in zip(records, replies, strict=True)
        ]

    async def _get_many(self, invocation_ids: list[str]) -> list[InvocationRecord | None]:
        keys = [f"{self.prefix}inv:{invocation_id}" for invocation_id in invocation_ids]
        texts = await self._call(f"read {len(keys)} records", lambda: self._client.mget(keys))
        return [
            None if text is None else self._decode(text, invocation_id)
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
        args: list[str | int] = [self.prefix, consumer, max_items, repr(visibility_timeout)]
        args += queues
        streams = [f"{self.prefix}q:{queue}" for queue in queues]
        what = f"receive from {', '.join(queues)}"
        deadline = time.monotonic() + wait
        while True:
            reply = await self._call(what, lambda: self._receive_script(args=args))
            flat = reply[0]
            if flat:
                return [
                    Delivery(invocation_id, queue, f"{queue}/{entry}/{count}", int(count))
                    for queue, entry, invocation_id, count in zip(
                        flat[0::4], flat[1::4], flat[2::4], flat[3::4], strict=True
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
        ]
        await self._call(
            f"retry invocation {delivery.invocation_id}", lambda: self._retry_script(args=args)
        )

    async def _release(self, deliveries: list[Delivery]) -> None:
        receipts = self._receipt_args(deliveries)
        if receipts:
            # Deadline 0: due at once, and first in line (ahead of newer entries).
            args = [self.prefix, "", *receipts]
            await self._call(
                f"release {len(deliveries)} deliveries", lambda: self._deadline_script(args=args)
            )

    async def _watch_final(self) -> AsyncGenerator[set[str], None]:
        what = "watch for finished invocations"
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call(what, lambda: pubsub.subscribe(f"{self.prefix}final"))
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
                        ids.add(message["data"])
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
        await self._client.aclose(close_connection_pool=True)
