"""The broker interface: durable invocation records and at-least-once queues.

A broker keeps two things, in one backend so that they change together:

* **invocation records** (:class:`~acall.dto.InvocationRecord`) — the call, its status,
  attempts, error and result — readable by any client;
* **queues** of invocations to run, with *at-least-once* delivery: a worker receives an
  entry, which stays invisible to other workers for a visibility timeout; the worker
  acknowledges it once the outcome is recorded, extends it while it still works, or the
  entry becomes deliverable again when the timeout passes (a worker killed mid-task
  loses nothing).

Deduplication (concurrency control ``ARGUMENTS`` / ``KEYS``) is part of submission: a
record carrying a ``dedup_key`` is stored only if no *non-final* invocation holds that
key; otherwise the existing invocation's record is returned. This check-and-insert is
atomic across processes (a unique constraint in SQLite, a Lua script in Redis).

Receipts: every delivery of an entry gets its own receipt, and only the latest one is
*current*. Once an entry has been redelivered (its visibility timeout passed), acked or
retried, operations with an earlier receipt are no-ops: :meth:`Broker.ack`,
:meth:`Broker.extend`, :meth:`Broker.release` and :meth:`Broker.retry` change nothing,
and :meth:`Broker.finish` still records the outcome (if none is recorded yet) but does
not acknowledge the entry, which belongs to the current holder.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from types import TracebackType
from typing import ClassVar, Final, Self

import attrs

from acall._slots import slot_constructor
from acall.dto import InvocationRecord, InvocationStatus

__all__ = ["Broker", "DamagedRecord", "Delivery", "ScannedRecord"]


@attrs.frozen(slots=True)
class Delivery:
    """One received queue entry.

    :ivar invocation_id: the invocation to run.
    :ivar queue: the queue it came from.
    :ivar receipt: backend handle for ack / extend / release / retry / finish (opaque).
        Unique per delivery: a redelivery of the same entry gets a new receipt, and an
        operation with a stale receipt is a no-op (see each method).
    :ivar delivery_count: how many times this entry has been delivered since it was
        enqueued, this delivery included (1 = first). Redeliveries after a visibility
        timeout and deliveries that were released count; :meth:`Broker.retry` enqueues
        the invocation as a new entry, whose count starts again at 1. (The record's
        ``attempt``, in contrast, counts every delivery of the invocation that was not
        given back with :meth:`Broker.release`.)
    :ivar record: the invocation's record as claimed by :meth:`Broker.receive`: for a
        non-final invocation already marked RUNNING (attempt + 1, ``worker_id`` = the
        consumer); a final one is returned unchanged (the worker only acknowledges it);
        ``None`` if the record no longer exists, or cannot be read (a damaged record is
        logged by the broker and left as it is, rather than failing every receive).
    """

    invocation_id: str
    queue: str
    receipt: str
    delivery_count: int = 1
    record: InvocationRecord | None = None


#: ``Delivery(invocation_id, queue, receipt, delivery_count, record)``, all five given;
#: faster where the C extension is built (see :mod:`acall._slots`).
make_delivery: Final = slot_constructor(Delivery, ("id", "q", "r", 2, "record"), acyclic=())


@attrs.frozen(slots=True)
class DamagedRecord:
    """A stored record that :meth:`Broker.scan_records` could not decode.

    :ivar invocation_id: whose record it is.
    :ivar text: the stored text, as found (maintenance tools may still search it).
    :ivar error: why it could not be decoded.
    """

    invocation_id: str
    text: str
    error: str


#: What :meth:`Broker.scan_records` yields for each stored record.
ScannedRecord = InvocationRecord | DamagedRecord


class Broker(abc.ABC):
    """Invocation records plus at-least-once queues. All methods are coroutine-safe.

    Implementations: :class:`~acall.brokers.memory.MemoryBroker`,
    :class:`~acall.brokers.sqlite.SqliteBroker`, :class:`~acall.brokers.redis.RedisBroker`;
    choose one by URL with :func:`acall.brokers.open_broker`.
    """

    #: The URL this broker was opened with, password redacted.
    url: str

    #: Whether :meth:`get_now` can read a record without waiting (the broker holds its
    #: records in this process). Where it cannot, use :meth:`get`.
    reads_in_process: ClassVar[bool] = False

    # -- submission ------------------------------------------------------------------

    @abc.abstractmethod
    async def submit(self, record: InvocationRecord) -> InvocationRecord:
        """Store *record* and enqueue it on ``record.queue``, durably, atomically.

        If ``record.dedup_key`` is set and a non-final invocation already holds that
        key, nothing is stored and that invocation's record is returned instead (the
        caller compares ``invocation_id`` to know). Otherwise returns *record*.
        A record whose ``not_before`` lies in the future becomes deliverable then.

        Submitting an invocation id that is already stored changes nothing (no second
        queue entry, whatever the new record says) and returns the stored record as it
        is now, so a submission retried after a lost reply is harmless.

        :raises ValueError: if the record's status is final.
        """

    @abc.abstractmethod
    async def submit_many(self, records: Sequence[InvocationRecord]) -> list[InvocationRecord]:
        """:meth:`submit` for many records in one round trip / transaction.

        Returns, position by position, the stored record or the existing duplicate.
        """

    # -- records ---------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, invocation_id: str) -> InvocationRecord | None:
        """The current record of an invocation, or ``None`` if unknown."""

    @abc.abstractmethod
    async def get_many(self, invocation_ids: Sequence[str]) -> list[InvocationRecord | None]:
        """Records of several invocations in one round trip, in the given order."""

    async def get_final_many(
        self, invocation_ids: Sequence[str]
    ) -> list[InvocationRecord | InvocationStatus | None]:
        """For each id, in order: its record if it is final, its status if it is not,
        ``None`` if unknown.

        What a result waiter asks: a broker reading records with a round trip may tell
        a live record by the status its text starts with, without decoding the rest.
        """
        return [
            record if record is None or record.status.is_final else record.status
            for record in await self.get_many(invocation_ids)
        ]

    def get_now(self, invocation_id: str) -> InvocationRecord | None:
        """:meth:`get` without waiting, where :attr:`reads_in_process` is true.

        :raises NotImplementedError: where records are read with a round trip.
        """
        raise NotImplementedError(f"{type(self).__name__} reads records with a round trip")

    @abc.abstractmethod
    async def find_by_call(self, call_key: str, limit: int = 100) -> list[InvocationRecord]:
        """Records of invocations of the call with this key, oldest first (at most *limit*).

        Oldest means first submitted; each record is returned as it is now. Finished
        invocations are included until their records expire.

        :raises InvalidKeyError: if *call_key* is not a well-formed call key
            (:meth:`acall.ids.CallId.from_key`).
        """

    @abc.abstractmethod
    async def update(self, record: InvocationRecord) -> None:
        """Overwrite an invocation's record (status changes made by a worker).

        When the new status is final, the record's dedup key (if it still maps to this
        invocation) is released in the same step, and watchers are told
        (:meth:`watch_final`).
        """

    # -- consuming -------------------------------------------------------------------

    @abc.abstractmethod
    async def receive(
        self,
        queues: Sequence[str],
        max_items: int,
        *,
        consumer: str,
        visibility_timeout: float,
        wait: float,
    ) -> list[Delivery]:
        """Take up to *max_items* deliverable entries from *queues*.

        Entries come in submission order per queue; an entry whose record has a future
        ``not_before`` is not deliverable yet. Each returned entry is invisible to every
        other consumer for *visibility_timeout* seconds unless acked, extended, retried,
        finished or released. Waits up to *wait* seconds when nothing is deliverable
        (returning an empty list then).

        In the same atomic step, each claimed non-final invocation's record is updated
        to status RUNNING, ``attempt + 1``, ``worker_id = consumer`` and ``updated_at =
        now``, and returned in :attr:`Delivery.record` (saving the worker a read and a
        write per invocation). Every delivery counts as an attempt, a redelivery after
        the visibility timeout included; releasing an entry does not undo it.
        """

    @abc.abstractmethod
    async def finish(self, outcomes: Sequence[tuple[Delivery, InvocationRecord]]) -> None:
        """Record final outcomes and acknowledge their entries, all in one atomic step.

        For each ``(delivery, record)`` (``record.status`` SUCCESS or FAILED): store the
        record unless the invocation is already final (the first recorded outcome wins,
        so a run repeated after a redelivery never overwrites it), release its dedup
        key, tell watchers (:meth:`watch_final`), and acknowledge the entry if the
        receipt is still current. One transaction / round trip for the whole batch.

        A stale receipt does not stop the record from being stored (it is the first
        outcome if none is recorded yet); only the acknowledgement is skipped. An
        invocation the broker no longer knows (its record expired) is not stored again.
        An empty batch does nothing.

        :raises ValueError: if a record's status is not final, or a record and its
            delivery are of different invocations (checked before anything changes).
        """

    @abc.abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """The entry is done (its outcome is recorded): never deliver it again.

        A no-op with a stale receipt (see :class:`Delivery`), and when repeated.
        """

    @abc.abstractmethod
    async def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float) -> None:
        """Keep entries invisible for another *visibility_timeout* seconds (still working).

        Entries whose receipt is stale are skipped.
        """

    @abc.abstractmethod
    async def retry(self, delivery: Delivery, record: InvocationRecord, delay: float) -> None:
        """Atomically store *record* (status RETRYING) and re-deliver the entry after *delay*.

        The entry is enqueued again as a new entry (``delivery_count`` restarts). With
        a stale receipt nothing happens, not even the record write: the invocation
        belongs to whoever holds the current delivery.
        """

    @abc.abstractmethod
    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give entries back at once, without an outcome (a worker shutting down: the
        invocation was not started, or was cut short, or its outcome was not recorded).

        A released entry keeps its place at the front of its queue and its
        ``delivery_count``. In the same atomic step its record, if still RUNNING, goes
        back to waiting: the delivery's own record, as :meth:`receive` claimed it, with
        :func:`acall.dto.unclaimed` applied (PENDING, or RETRYING after a failed
        attempt; the attempt :meth:`receive` counted taken back; no worker), so a
        worker that stops costs no invocation one of its retries. Entries whose
        receipt is stale are skipped, their records untouched. Do not use the
        deliveries afterwards, not even to extend them: on Redis a receipt stays
        current until the entry's next delivery.
        """

    # -- observation -----------------------------------------------------------------

    @abc.abstractmethod
    def scan_records(self, batch_size: int = 500) -> AsyncIterator[list[ScannedRecord]]:
        """Yield every stored record, in batches of at most *batch_size*.

        Pending, running and retrying records, and finished ones until their
        ``record_ttl`` runs out. A record that cannot be decoded comes as a
        :class:`DamagedRecord` instead of stopping the scan. For maintenance (the blob
        collector), not hot paths: a record stored or changed while the scan runs may
        be missed or seen twice, but one that stays unchanged throughout is seen, at
        least once (on Redis it may come twice when keys are removed while the scan
        runs: callers must tolerate repeats). The scan holds one batch at a time,
        whatever the number of records.
        """

    @abc.abstractmethod
    def watch_final(self) -> AsyncGenerator[set[str], None]:
        """Yield sets of invocation ids that reached a final status.

        Best effort and low latency (an in-process event, a Redis pub/sub channel, a
        SQLite sequence column): a notification may be missed across a reconnect, so
        waiters also poll now and then. May yield an empty set as a periodic tick.

        The first item is an empty set, yielded as soon as the subscription is in place:
        a caller that checks the records it waits for at that point misses nothing that
        finished before.
        """

    @abc.abstractmethod
    async def counts(self) -> dict[InvocationStatus, int]:
        """Number of invocations per status (for progress reports)."""

    @abc.abstractmethod
    async def pending_count(self, queue: str) -> int:
        """Entries of *queue* not yet acknowledged (deliverable, delayed or in flight)."""

    # -- lifecycle -------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
