"""An in-process broker: records in a dict, queues in heaps, waiters woken by events.

``memory://`` gives a private broker; ``memory://name`` shares records and queues with
every other ``memory://name`` broker in the process (a client and a worker in one
program). Nothing survives the process.

All state changes happen between two awaits, so they are atomic without locks; that
also means one broker (and one name) serves one event loop at a time. Deadlines use
the monotonic clock; a record's ``not_before`` (wall-clock time) is converted once, at
submission.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, TypeVar

import anyio
from anyio.lowlevel import checkpoint

from acall.brokers._common import DEFAULT_RECORD_TTL, BrokerBase, check_name
from acall.brokers._packed import Packed, RecordPacker
from acall.brokers.base import Delivery, ScannedRecord, make_delivery
from acall.dto import InvocationRecord, InvocationStatus, claimed
from acall.errors import ConfigurationError
from acall.stores.base import is_key, validate_ttl

__all__ = ["MemoryBroker"]

_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")

#: Stale heap items a queue may hold beyond twice its live entries before it is rebuilt.
_COMPACT_SLACK: Final = 1024

#: Finished records packed at most per broker operation.
ARCHIVE_BATCH: Final = 1000

#: Seconds a finished record stays an object before it is packed (see _packed.py): long
#: enough for the clients waiting on it to read it as it is.
ARCHIVE_AFTER: Final = 1.0


class _Entry:
    """One queue entry. ``version`` changes with every state change, which makes the
    heap items pushed for earlier states recognisably stale."""

    __slots__ = (
        "delivery_count",
        "heaps",
        "invocation_id",
        "queue",
        "receipt",
        "seq",
        "version",
    )

    def __init__(self, invocation_id: str, queue: str, heaps: _Queue, seq: int) -> None:
        self.invocation_id = invocation_id
        self.queue = queue
        #: The queue's heaps (queues are never dropped: no look-up by name each time).
        self.heaps = heaps
        self.seq = seq
        self.receipt: str | None = None
        self.delivery_count = 0
        self.version = 0


# A heap item: (seq or visible-at time, entry version, invocation id).
_Item = TypeVar("_Item", bound=tuple[float, int, str])


class _Queue:
    """Entries of one queue: deliverable ones by submission order, others by due time."""

    __slots__ = ("ready", "size", "waiting")

    def __init__(self) -> None:
        self.ready: list[tuple[int, int, str]] = []  # (seq, version, invocation id)
        self.waiting: list[tuple[float, int, str]] = []  # (visible at, version, id)
        self.size = 0


class _Watcher:
    """One :meth:`MemoryBroker.watch_final` iterator: ids not yet yielded, and its wake-up."""

    __slots__ = ("event", "ids")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.event: anyio.Event | None = None

    def wake(self) -> None:
        event = self.event
        if event is not None:
            self.event = None  # woken once: later finishes before it runs only add ids
            event.set()


class _MemoryData:
    """The state behind one or more :class:`MemoryBroker` objects."""

    def __init__(self) -> None:
        # Live records, and finished ones until they are packed into the archive.
        self.records: dict[str, InvocationRecord] = {}
        self.archive: dict[str, Packed] = {}
        self.packer = RecordPacker()
        # (finished at, id) in the order they finished: the records to pack next.
        self.to_archive: deque[tuple[float, str]] = deque()
        # Receipts only need to be unique per delivery within this state: a counter does.
        self.receipts = itertools.count(1)
        # Call key -> ids of its invocations in submission order (a dict as ordered set).
        # The one id as a str (the usual case), several as a dict: a dict of strs is not
        # tracked by the garbage collector, so a week of finished calls costs it nothing.
        self.by_call: dict[str, str | dict[str, None]] = {}
        self.dedup: dict[str, str] = {}
        self.entries: dict[str, _Entry] = {}
        self.queues: dict[str, _Queue] = {}
        # Finished invocation id -> expiry, in the order they finished.
        self.finished: dict[str, float] = {}
        # No record is to be packed or forgotten before this (monotonic) time: purge(),
        # called at every operation, returns at once until then.
        self.purge_at = math.inf
        # Each waiting receive() owns an event created in its own task (an event bound
        # to an event loop that has gone away must never be shared).
        self.waiters: set[anyio.Event] = set()
        self.watchers: set[_Watcher] = set()
        self.next_seq = 0

    def record(self, invocation_id: str) -> InvocationRecord | None:
        """The current record of *invocation_id*, live or archived, or ``None``."""
        record = self.records.get(invocation_id)
        if record is None and self.archive:
            packed = self.archive.get(invocation_id)
            if packed is not None:
                return self.packer.unpack(packed)
        return record

    def put(self, invocation_id: str, record: InvocationRecord) -> None:
        """Store *record* as the current one (over an archived one too)."""
        self.records[invocation_id] = record
        if self.archive:
            self.archive.pop(invocation_id, None)

    def statuses(self) -> list[InvocationStatus]:
        status = self.packer.status
        return [
            *(record.status for record in self.records.values()),
            *(status(p) for p in self.archive.values()),
        ]

    def index_call(self, call_key: str, invocation_id: str) -> None:
        known = self.by_call.get(call_key)
        if known is None:
            self.by_call[call_key] = invocation_id
        elif isinstance(known, str):
            self.by_call[call_key] = {known: None, invocation_id: None}
        else:
            known[invocation_id] = None

    def unindex_call(self, call_key: str, invocation_id: str) -> None:
        known = self.by_call.get(call_key)
        if known == invocation_id:
            del self.by_call[call_key]
        elif isinstance(known, dict):
            known.pop(invocation_id, None)
            if not known:
                del self.by_call[call_key]

    def call_ids(self, call_key: str) -> list[str]:
        """Ids of the invocations of *call_key*, in submission order."""
        known = self.by_call.get(call_key)
        if known is None:
            return []
        return [known] if isinstance(known, str) else list(known)

    def queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue()
        return queue

    def current(self, invocation_id: str, version: int) -> _Entry | None:
        entry = self.entries.get(invocation_id)
        return entry if entry is not None and entry.version == version else None

    def place(self, entry: _Entry, visible_at: float, now: float) -> None:
        """Record a state change of *entry*: deliverable now, or from *visible_at* on."""
        entry.version += 1
        queue = entry.heaps
        if visible_at <= now:
            heapq.heappush(queue.ready, (entry.seq, entry.version, entry.invocation_id))
        else:
            heapq.heappush(queue.waiting, (visible_at, entry.version, entry.invocation_id))

    def enqueue(self, invocation_id: str, queue: str, visible_at: float, now: float) -> None:
        self.next_seq += 1
        heaps = self.queues.get(queue) or self.queue(queue)
        entry = self.entries[invocation_id] = _Entry(invocation_id, queue, heaps, self.next_seq)
        heaps.size += 1
        self.place(entry, visible_at, now)

    def requeue(self, entry: _Entry, visible_at: float, now: float) -> None:
        """Put *entry* at the back of its queue as a fresh, undelivered entry."""
        self.next_seq += 1
        entry.seq = self.next_seq
        entry.delivery_count = 0
        entry.receipt = None
        self.place(entry, visible_at, now)

    def remove(self, entry: _Entry) -> None:
        del self.entries[entry.invocation_id]
        queue = entry.heaps
        queue.size -= 1
        # Every delivery leaves a visibility item in `waiting` that goes stale when the
        # entry is finished, and is otherwise only dropped when it comes due (after the
        # visibility timeout): at thousands of tasks a second, hundreds of thousands of
        # items. Once stale ones clearly outnumber the live, the heap is rebuilt without
        # them (amortized constant time per removal).
        limit = 2 * queue.size + _COMPACT_SLACK
        if len(queue.waiting) > limit:
            queue.waiting = self._live_items(queue.waiting)
        if len(queue.ready) > limit:
            queue.ready = self._live_items(queue.ready)

    def _live_items(self, heap: list[_Item]) -> list[_Item]:
        """*heap* without its stale items, as a heap again."""
        live = [item for item in heap if self.current(item[2], item[1]) is not None]
        heapq.heapify(live)
        return live

    def holding(self, invocation_id: str, receipt: str) -> _Entry | None:
        entry = self.entries.get(invocation_id)
        return entry if entry is not None and entry.receipt == receipt else None

    def take(
        self,
        names: list[str],
        max_items: int,
        now: float,
        visibility_timeout: float,
        consumer: str,
    ) -> list[Delivery]:
        """Claim up to *max_items* entries, marking their non-final records RUNNING."""
        queues = [self.queue(name) for name in names]
        for queue in queues:
            while queue.waiting and queue.waiting[0][0] <= now:
                _, version, invocation_id = heapq.heappop(queue.waiting)
                entry = self.current(invocation_id, version)
                if entry is not None:
                    heapq.heappush(queue.ready, (entry.seq, version, invocation_id))
        taken: list[Delivery] = []
        wall_now = time.time()
        entries = self.entries
        records = self.records
        receipts = self.receipts
        visible_at = now + visibility_timeout
        heappop = heapq.heappop
        while len(taken) < max_items:
            best: _Queue | None = None
            for queue in queues:
                ready = queue.ready
                # (What current() does, inline: this runs for every entry taken.)
                while ready:
                    head = ready[0]
                    live = entries.get(head[2])
                    if live is not None and live.version == head[1]:
                        break
                    heappop(ready)  # stale
                if ready and (best is None or ready[0] < best.ready[0]):
                    best = queue
            if best is None:
                break
            invocation_id = heappop(best.ready)[2]
            entry = entries[invocation_id]
            entry.receipt = receipt = f"r{next(receipts)}"
            entry.delivery_count += 1
            self.place(entry, visible_at, now)
            record = records.get(invocation_id)
            if record is None:
                record = self.record(invocation_id)  # archived (finished), or gone
            elif not record.status.is_final:
                record = records[invocation_id] = claimed(record, consumer, wall_now)
            taken.append(
                make_delivery(invocation_id, entry.queue, receipt, entry.delivery_count, record)
            )
        return taken

    def store_final(
        self,
        record: InvocationRecord,
        previous: InvocationRecord,
        now: float,
        record_ttl: float | None,
    ) -> None:
        """Store a final *record* over the *previous* one (the stored record, which the
        caller has read already): release its key, notify watchers."""
        invocation_id = record.invocation_id
        self.put(invocation_id, record)
        self.to_archive.append((now, invocation_id))
        self.finished.pop(invocation_id, None)
        key = previous.dedup_key
        if key is not None and self.dedup.get(key) == invocation_id:
            del self.dedup[key]
        if record_ttl is not None:
            self.finished[invocation_id] = now + record_ttl
            self.purge_at = min(self.purge_at, now + ARCHIVE_AFTER, now + record_ttl)
        else:
            self.purge_at = min(self.purge_at, now + ARCHIVE_AFTER)
        for watcher in self.watchers:
            watcher.ids.add(invocation_id)
            if watcher.event is not None:
                watcher.wake()

    def next_due(self, names: list[str]) -> float:
        """Earliest time an entry of *names* may become deliverable (may be stale: early)."""
        due = [q.waiting[0][0] for name in names if (q := self.queues.get(name)) and q.waiting]
        return min(due, default=float("inf"))

    def wake_receivers(self) -> None:
        for event in self.waiters:
            event.set()
        self.waiters.clear()

    def purge(self, now: float) -> None:
        """Forget finished invocations whose record_ttl has passed; pack the finished
        records that have been kept as objects long enough."""
        if now < self.purge_at:
            return
        to_archive = self.to_archive
        if to_archive and to_archive[0][0] <= now - ARCHIVE_AFTER:
            self._archive_until(now - ARCHIVE_AFTER)
        expired = []
        for invocation_id, expires_at in self.finished.items():
            if expires_at > now:
                break
            expired.append(invocation_id)
        for invocation_id in expired:
            del self.finished[invocation_id]
            call_key = self._forget(invocation_id)
            if call_key is not None:
                self.unindex_call(call_key, invocation_id)
            entry = self.entries.get(invocation_id)
            if entry is not None:
                self.remove(entry)
        # When the next purge has work (the rest of a bounded archiving batch: now).
        purge_at = to_archive[0][0] + ARCHIVE_AFTER if to_archive else math.inf
        for expires_at in self.finished.values():  # the loop above stops at the first
            purge_at = min(purge_at, expires_at)
            break
        self.purge_at = purge_at

    def _forget(self, invocation_id: str) -> str | None:
        """Drop the record of *invocation_id*; return its call key (``None`` if unknown)."""
        record = self.records.pop(invocation_id, None)
        if record is not None:
            return record.call_id.key
        packed = self.archive.pop(invocation_id, None)
        return None if packed is None else self.packer.call_key(packed)

    def _archive_until(self, cutoff: float) -> None:
        to_archive = self.to_archive
        pack = self.packer.pack
        # A bounded share per call (about 1 ms): purge runs on the event loop at every
        # operation, and a burst of 20,000 finishes would otherwise be packed at once.
        for _ in range(min(len(to_archive), ARCHIVE_BATCH)):
            if to_archive[0][0] > cutoff:
                break
            invocation_id = to_archive.popleft()[1]
            record = self.records.get(invocation_id)
            # Skipped: forgotten, archived already (finished twice), or live again.
            if record is not None and record.status.is_final:
                self.archive[invocation_id] = pack(record)
                del self.records[invocation_id]


_named: dict[str, _MemoryData] = {}
_named_lock = threading.Lock()


class MemoryBroker(BrokerBase):
    """A broker in this process's memory.

    :param name: share records and queues with every other broker of that name in the
        process; ``None`` gives a private broker whose data is dropped on :meth:`close`.
    :param record_ttl: seconds a finished record is kept (``None``: forever).
    :ivar name: the shared name, or ``None``.
    :ivar record_ttl: see the parameter.
    """

    reads_in_process = True

    def __init__(
        self, name: str | None = None, *, record_ttl: float | None = DEFAULT_RECORD_TTL
    ) -> None:
        if name is None:
            data = _MemoryData()
            url = "memory://"
        else:
            if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
                raise ConfigurationError(
                    f"invalid memory broker name {name!r:.80}: use letters, digits, "
                    "'_', '.' and '-' (for example memory://jobs)"
                )
            with _named_lock:
                data = _named.setdefault(name, _MemoryData())
            url = f"memory://{name}"
        super().__init__(url)
        self.name = name
        self.record_ttl = validate_ttl(record_ttl, what="record_ttl")
        self._data = data
        self._watchers: set[_Watcher] = set()

    @staticmethod
    def drop(name: str) -> bool:
        """Forget the shared data of ``memory://name``; return whether it existed.

        Brokers still open on that name keep the old data; new ones start empty.
        """
        with _named_lock:
            return _named.pop(name, None) is not None

    async def _submit_many(self, records: list[InvocationRecord]) -> list[InvocationRecord]:
        await checkpoint()
        data = self._data
        now = time.monotonic()
        wall = time.time()
        data.purge(now)
        result: list[InvocationRecord] = []
        for record in records:
            invocation_id = record.invocation_id
            stored = data.record(invocation_id)
            if stored is not None:
                result.append(stored)
                continue
            key = record.dedup_key
            if key is not None:
                holder = data.record(data.dedup.get(key, ""))
                if holder is not None and not holder.status.is_final:
                    result.append(holder)
                    continue
                data.dedup[key] = invocation_id
            data.records[invocation_id] = record
            data.index_call(record.call.call_id.key, invocation_id)
            delay = 0.0 if record.not_before is None else record.not_before - wall
            data.enqueue(invocation_id, record.queue, now + delay, now)
            result.append(record)
        data.wake_receivers()
        return result

    async def _get_many(self, invocation_ids: list[str]) -> list[InvocationRecord | None]:
        await checkpoint()
        data = self._data
        data.purge(time.monotonic())
        return [data.record(invocation_id) for invocation_id in invocation_ids]

    def get_now(self, invocation_id: str) -> InvocationRecord | None:
        """The current record of an invocation, or ``None`` if unknown; no waiting."""
        if not is_key(invocation_id):
            check_name(invocation_id, "invocation id")
        if self._closed:
            self._check_open()
        data = self._data
        now = time.monotonic()
        if now >= data.purge_at:
            data.purge(now)
        record = data.records.get(invocation_id)
        return record if record is not None else data.record(invocation_id)

    async def _update(self, record: InvocationRecord) -> bool:
        await checkpoint()
        data = self._data
        now = time.monotonic()
        data.purge(now)
        invocation_id = record.invocation_id
        previous = data.record(invocation_id)
        if previous is None:
            return False
        if record.status.is_final:
            data.store_final(record, previous, now, self.record_ttl)
        else:
            data.put(invocation_id, record)
            data.finished.pop(invocation_id, None)
        return True

    async def _find_by_call(self, call_key: str, limit: int) -> list[InvocationRecord]:
        await checkpoint()
        data = self._data
        data.purge(time.monotonic())
        found: list[InvocationRecord] = []
        for invocation_id in data.call_ids(call_key):
            if len(found) == limit:
                break
            record = data.record(invocation_id)
            if record is not None:
                found.append(record)
        return found

    async def _receive(
        self,
        queues: list[str],
        max_items: int,
        consumer: str,
        visibility_timeout: float,
        wait: float,
    ) -> list[Delivery]:
        data = self._data
        deadline = time.monotonic() + wait
        while True:
            await checkpoint()
            now = time.monotonic()
            taken = data.take(queues, max_items, now, visibility_timeout, consumer)
            if taken or now >= deadline:
                return taken
            # No await between looking and registering: a submission cannot slip between.
            event = anyio.Event()
            data.waiters.add(event)
            try:
                with anyio.move_on_after(min(deadline, data.next_due(queues)) - now):
                    await event.wait()
            finally:
                data.waiters.discard(event)

    async def _finish(self, outcomes: list[tuple[Delivery, InvocationRecord]]) -> None:
        await checkpoint()
        data = self._data
        now = time.monotonic()
        data.purge(now)
        records, entries = data.records, data.entries
        for delivery, record in outcomes:
            # (What record() and holding() do, inline: this runs for every outcome.)
            invocation_id = record.invocation_id
            stored = records.get(invocation_id) or data.record(invocation_id)
            if stored is not None and not stored.status.is_final:
                data.store_final(record, stored, now, self.record_ttl)
            entry = entries.get(delivery.invocation_id)
            if entry is not None and entry.receipt == delivery.receipt:
                data.remove(entry)

    async def _ack(self, delivery: Delivery) -> None:
        await checkpoint()
        entry = self._data.holding(delivery.invocation_id, delivery.receipt)
        if entry is not None:
            self._data.remove(entry)

    async def _extend(self, deliveries: list[Delivery], visibility_timeout: float) -> None:
        await checkpoint()
        now = time.monotonic()
        for delivery in deliveries:
            entry = self._data.holding(delivery.invocation_id, delivery.receipt)
            if entry is not None:
                self._data.place(entry, now + visibility_timeout, now)

    async def _retry(self, delivery: Delivery, record: InvocationRecord, delay: float) -> None:
        await checkpoint()
        data = self._data
        entry = data.holding(delivery.invocation_id, delivery.receipt)
        if entry is None:
            return
        now = time.monotonic()
        data.put(record.invocation_id, record)
        data.finished.pop(record.invocation_id, None)
        data.requeue(entry, now + delay, now)
        data.wake_receivers()

    async def _release(
        self, deliveries: list[Delivery], records: list[InvocationRecord | None]
    ) -> None:
        await checkpoint()
        data = self._data
        now = time.monotonic()
        for delivery, record in zip(deliveries, records, strict=True):
            entry = data.holding(delivery.invocation_id, delivery.receipt)
            if entry is not None:
                entry.receipt = None
                if record is not None:
                    current = data.record(delivery.invocation_id)
                    if current is not None and current.status is InvocationStatus.RUNNING:
                        data.put(delivery.invocation_id, record)
                # Same seq: a released entry keeps its place at the front of the queue.
                data.place(entry, now, now)
        data.wake_receivers()

    async def _watch_final(self) -> AsyncGenerator[set[str], None]:
        watcher = _Watcher()
        self._data.watchers.add(watcher)
        self._watchers.add(watcher)
        try:
            yield set()  # subscribed: see Broker.watch_final
            while not self._closed:
                if not watcher.ids:
                    watcher.event = anyio.Event()
                    await watcher.event.wait()
                    watcher.event = None
                    continue
                ids, watcher.ids = watcher.ids, set()
                yield ids
        finally:
            self._data.watchers.discard(watcher)
            self._watchers.discard(watcher)

    async def _scan_records(self, batch_size: int) -> AsyncIterator[list[ScannedRecord]]:
        await checkpoint()
        self._data.purge(time.monotonic())
        # A snapshot: records are immutable values, replaced (never changed) on update.
        data = self._data
        records: list[ScannedRecord] = list(data.records.values())
        for start in range(0, len(records), batch_size):
            yield records[start : start + batch_size]
            await checkpoint()
        # Archived ones are unpacked a batch at a time.
        packed = list(data.archive.values())
        unpack = data.packer.unpack
        for start in range(0, len(packed), batch_size):
            yield [unpack(p) for p in packed[start : start + batch_size]]
            await checkpoint()

    async def _counts(self) -> dict[InvocationStatus, int]:
        await checkpoint()
        self._data.purge(time.monotonic())
        return dict(Counter(self._data.statuses()))

    async def _pending_count(self, queue: str) -> int:
        await checkpoint()
        self._data.purge(time.monotonic())
        found = self._data.queues.get(queue)
        return 0 if found is None else found.size

    async def _close(self) -> None:
        await checkpoint()
        for watcher in self._watchers:
            watcher.wake()
        if self.name is None:
            self._data = _MemoryData()
