"""What every acall broker shares: input validation, lifecycle, and record decoding.

:class:`BrokerBase` implements the public :class:`~acall.brokers.base.Broker` methods by
validating their arguments (ids, queue names, numbers) and then calling a protected
``_method`` that a backend implements, so a malformed id or queue name never reaches a
SQL statement or a Redis key, whatever the backend. It is the broker counterpart of
:class:`acall.stores.base.Store`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Final

from acall.brokers.base import Broker, DamagedRecord, Delivery, ScannedRecord
from acall.dto import DTOCodec, InvocationRecord, InvocationStatus, unclaimed
from acall.errors import (
    BrokerError,
    ConfigurationError,
    DTOValidationError,
    InvalidKeyError,
    short_repr,
)
from acall.ids import CallId
from acall.stores.base import is_key

__all__ = [
    "DEFAULT_RECORD_TTL",
    "FINAL_STATUSES",
    "BrokerBase",
    "check_name",
    "check_seconds",
]

#: Seconds a finished record is kept by default (7 days); pending ones never expire.
DEFAULT_RECORD_TTL: Final = 7 * 24 * 3600.0

#: Status values after which nothing changes an invocation again.
FINAL_STATUSES: Final = tuple(status.value for status in InvocationStatus if status.is_final)

logger = logging.getLogger("acall.brokers")

_NAME_RULE: Final = "1 to 256 characters from A-Z, a-z, 0-9 and '_', '.', ':', '-'"
_MAX_DEDUP_KEY: Final = 1024
_MAX_CONSUMER: Final = 256


# The head of a record's JSON text with a live status, up to the status value.
_STATUS_HEAD: Final = '{"status":"'
_LIVE_STATUS: Final = {s.value: s for s in InvocationStatus if not s.is_final}
_HEAD_CHARS: Final = len(_STATUS_HEAD) + max(map(len, _LIVE_STATUS)) + 2


def live_status(text: str | bytes) -> InvocationStatus | None:
    """The live status a record's JSON text starts with, or ``None`` (a final status,
    or a text that does not start with its status member)."""
    head = text[:_HEAD_CHARS]
    if isinstance(head, bytes):
        head = head.decode("latin-1")
    if not head.startswith(_STATUS_HEAD):
        return None
    end = head.find('"', len(_STATUS_HEAD))
    if end < 0 or head[end + 1 : end + 2] != ",":
        return None
    return _LIVE_STATUS.get(head[len(_STATUS_HEAD) : end])


def check_name(value: object, what: str) -> str:
    """Return *value* if it is a valid invocation id or queue name, else raise.

    Both end up in SQL parameters and Redis key names; the store key alphabet keeps
    them printable, unambiguous and safe everywhere.

    :raises InvalidKeyError: naming *what* and the rejected value.
    """
    if is_key(value):
        return value
    if not isinstance(value, str):
        raise InvalidKeyError(
            f"invalid {what} {short_repr(value)}: expected a str, got {type(value).__name__}"
        )
    raise InvalidKeyError(f"invalid {what} {value!r:.120}: use {_NAME_RULE}")


def check_seconds(value: object, what: str, *, allow_zero: bool) -> float:
    """Return *value* as a finite number of seconds (> 0, or >= 0 with *allow_zero*).

    :raises ConfigurationError: for anything else, naming *what*.
    """
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"{what} must be a number of seconds {bound}, got {type(value).__name__} {value!r:.80}"
        )
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigurationError(
            f"{what} must be a finite number of seconds {bound}, got {value!r}"
        )
    return seconds


def _check_record(record: object, *, action: str) -> InvocationRecord:
    if not isinstance(record, InvocationRecord):
        raise TypeError(f"cannot {action} {type(record).__name__}: expected an InvocationRecord")
    if not (is_key(record.invocation_id) and is_key(record.queue)):  # (hot path: no call)
        check_name(record.invocation_id, "invocation id")
        check_name(record.queue, "queue name")
    key = record.dedup_key
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= _MAX_DEDUP_KEY):
        raise InvalidKeyError(
            f"invalid dedup key {key!r:.120} of invocation {record.invocation_id}: expected "
            f"a non-empty str of at most {_MAX_DEDUP_KEY} characters, or None"
        )
    return record


def _check_unfinished(record: InvocationRecord, action: str) -> None:
    # A final record has nothing left to run: queueing it would only create an entry
    # that every worker acknowledges unread, and its dedup key would never be released.
    if record.status.is_final:
        raise ValueError(
            f"cannot {action} invocation {record.invocation_id} with final status "
            f"{record.status.value!r}; use update() to record an outcome"
        )


def _check_sequence(items: object, what: str) -> Sequence[object]:
    # A bare str is a Sequence too; treating it as characters would be a silent bug.
    if isinstance(items, str):
        raise InvalidKeyError(
            f"expected a sequence of {what}, got the single str {items!r:.120}; wrap it in a list"
        )
    if isinstance(items, bytes) or not isinstance(items, Sequence):
        raise TypeError(
            f"expected a sequence of {what}, got {type(items).__name__} {short_repr(items)}"
        )
    return items


def _check_delivery(delivery: object) -> Delivery:
    if not isinstance(delivery, Delivery):
        raise TypeError(f"expected a Delivery from receive(), got {type(delivery).__name__}")
    if not (is_key(delivery.invocation_id) and is_key(delivery.queue)):
        check_name(delivery.invocation_id, "invocation id")
        check_name(delivery.queue, "queue name")
    return delivery


def _check_outcome(outcome: object) -> tuple[Delivery, InvocationRecord]:
    if not isinstance(outcome, tuple | list) or len(outcome) != 2:
        raise TypeError(
            f"expected (Delivery, InvocationRecord) pairs, got {type(outcome).__name__} "
            f"{short_repr(outcome)}"
        )
    delivery = _check_delivery(outcome[0])
    record = _check_record(outcome[1], action="finish with")
    if not record.status.is_final:
        raise ValueError(
            f"cannot finish invocation {record.invocation_id} with status "
            f"{record.status.value!r}: an outcome is SUCCESS or FAILED (use retry() or "
            "update() for other changes)"
        )
    if record.invocation_id != delivery.invocation_id:
        raise ValueError(
            f"finish(): the record is for invocation {record.invocation_id} but the "
            f"delivery is for {delivery.invocation_id}"
        )
    return delivery, record


class BrokerBase(Broker):
    """Validation and lifecycle shared by acall's brokers; backends fill in ``_hooks``.

    Every public method validates its input, refuses to run on a closed broker
    (:class:`~acall.errors.BrokerError`), then calls the backend hook with checked,
    non-empty arguments.

    :ivar url: where the broker lives, with any password redacted.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._closed = False
        self._codec = DTOCodec()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} {self.url!r}{state}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    # -- public API: validation, then the backend -----------------------------------------

    async def submit(self, record: InvocationRecord) -> InvocationRecord:
        """Store and enqueue *record*, or return the non-final duplicate holding its key.

        Submitting an invocation id that is already stored changes nothing and returns
        the stored record, so a submission retried after a lost reply is harmless.

        :raises InvalidKeyError: for a malformed id, queue name or dedup key.
        :raises ValueError: for a record whose status is already final.
        """
        return (await self.submit_many([record]))[0]

    async def submit_many(self, records: Sequence[InvocationRecord]) -> list[InvocationRecord]:
        """Submit several records in one round trip; see :meth:`submit`.

        Every record is validated before anything is stored. Two records of the batch
        with the same dedup key behave as if submitted one after the other.
        """
        checked = [
            _check_record(record, action="submit")
            for record in _check_sequence(records, "InvocationRecord")
        ]
        for record in checked:
            _check_unfinished(record, "submit")
        self._check_open()
        if not checked:
            return []
        return await self._submit_many(checked)

    async def get(self, invocation_id: str) -> InvocationRecord | None:
        """The current record of an invocation, or ``None`` if unknown (or expired)."""
        return (await self.get_many([invocation_id]))[0]

    async def get_many(self, invocation_ids: Sequence[str]) -> list[InvocationRecord | None]:
        """Records of several invocations in one round trip, in the given order."""
        ids = self._checked_ids(invocation_ids)
        return await self._get_many(ids) if ids else []

    async def get_final_many(
        self, invocation_ids: Sequence[str]
    ) -> list[InvocationRecord | InvocationStatus | None]:
        """For each id, in order: its record if it is final, its status if it is not,
        ``None`` if unknown (one round trip)."""
        ids = self._checked_ids(invocation_ids)
        return [
            found.status
            if isinstance(found, InvocationRecord) and not found.status.is_final
            else found
            for found in (await self._get_final_many(ids) if ids else [])
        ]

    def _checked_ids(self, invocation_ids: Sequence[str]) -> list[str]:
        ids = [
            check_name(invocation_id, "invocation id")
            for invocation_id in _check_sequence(invocation_ids, "invocation ids")
        ]
        self._check_open()
        return ids

    async def find_by_call(self, call_key: str, limit: int = 100) -> list[InvocationRecord]:
        """Records of the invocations of one call, oldest submission first.

        Finished invocations are included until their ``record_ttl`` runs out.

        :raises InvalidKeyError: if *call_key* is not a well-formed call key.
        :raises ConfigurationError: if *limit* is not an int >= 1.
        """
        key = CallId.from_key(call_key).key
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit must be an int >= 1, got {limit!r:.80}")
        self._check_open()
        return await self._find_by_call(key, limit)

    async def update(self, record: InvocationRecord) -> None:
        """Overwrite a stored invocation's record; see :meth:`Broker.update`.

        A final status also starts the record's expiry (``record_ttl``).

        :raises BrokerError: if the invocation is unknown (never submitted, or expired).
        """
        record = _check_record(record, action="update")
        self._check_open()
        if not await self._update(record):
            raise BrokerError(
                f"cannot update invocation {record.invocation_id} in {self.url}: it is not "
                "there (never submitted, or finished longer ago than record_ttl)"
            )

    async def receive(
        self,
        queues: Sequence[str],
        max_items: int,
        *,
        consumer: str,
        visibility_timeout: float,
        wait: float,
    ) -> list[Delivery]:
        """Take up to *max_items* deliverable entries; see :meth:`Broker.receive`.

        Entries come in submission order per queue (released ones first, in their old
        place). Each :class:`Delivery` gets a receipt unique to that delivery: after a
        redelivery the earlier receipt no longer matches, and ack / extend / release /
        retry with it do nothing. ``delivery_count`` counts every delivery of the entry,
        released ones included.

        Each delivery carries the invocation's record, claimed in the same atomic step:
        a non-final one is stored and returned as RUNNING with ``attempt + 1``,
        ``worker_id = consumer`` and ``updated_at = now`` (so every delivery, a
        redelivery after the visibility timeout included, counts as an attempt); a
        final one is returned unchanged; a missing or unreadable one is ``None`` (an
        unreadable record is logged and left as it is).
        """
        names = list(
            dict.fromkeys(
                check_name(queue, "queue name") for queue in _check_sequence(queues, "queue names")
            )
        )
        if not names:
            raise ConfigurationError("receive() needs at least one queue name")
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ConfigurationError(f"max_items must be an int >= 1, got {max_items!r:.80}")
        if not isinstance(consumer, str) or not 0 < len(consumer) <= _MAX_CONSUMER:
            raise InvalidKeyError(
                f"invalid consumer name {consumer!r:.120}: expected a non-empty str of at "
                f"most {_MAX_CONSUMER} characters"
            )
        timeout = check_seconds(visibility_timeout, "visibility_timeout", allow_zero=False)
        waiting = check_seconds(wait, "wait", allow_zero=True)
        self._check_open()
        return await self._receive(names, max_items, consumer, timeout, waiting)

    async def finish(self, outcomes: Sequence[tuple[Delivery, InvocationRecord]]) -> None:
        """Record final outcomes and acknowledge their entries; see :meth:`Broker.finish`.

        Every pair is checked before anything changes. A record is stored only if the
        stored one is not final yet (the first outcome wins, also within one batch),
        and only if the invocation is still known (not expired); the entry is
        acknowledged only if the receipt is current, while a stale receipt still lets
        the record be stored. Records stored here start their ``record_ttl``.

        :raises ValueError: for a non-final status, or a record and delivery of
            different invocations.
        :raises TypeError: for something other than ``(Delivery, InvocationRecord)``.
        """
        checked = [
            _check_outcome(outcome)
            for outcome in _check_sequence(outcomes, "(Delivery, InvocationRecord) pairs")
        ]
        self._check_open()
        if checked:
            await self._finish(checked)

    async def ack(self, delivery: Delivery) -> None:
        """The entry is done: never deliver it again.

        Does nothing if the receipt is stale (the entry was redelivered to another
        consumer since, or already acknowledged): that delivery is not ours to end.
        """
        delivery = _check_delivery(delivery)
        self._check_open()
        await self._ack(delivery)

    async def extend(self, deliveries: Sequence[Delivery], visibility_timeout: float) -> None:
        """Keep entries invisible for *visibility_timeout* more seconds from now.

        Stale receipts are skipped.
        """
        checked = [_check_delivery(d) for d in _check_sequence(deliveries, "Delivery")]
        timeout = check_seconds(visibility_timeout, "visibility_timeout", allow_zero=False)
        self._check_open()
        if checked:
            await self._extend(checked, timeout)

    async def retry(self, delivery: Delivery, record: InvocationRecord, delay: float) -> None:
        """Atomically store *record* and re-enqueue the entry, deliverable after *delay* s.

        The entry goes to the back of its queue as a new entry (its next delivery has
        ``delivery_count`` 1). With a stale receipt nothing happens, not even the
        record write: the invocation belongs to whoever holds the current delivery.
        """
        delivery = _check_delivery(delivery)
        record = _check_record(record, action="retry with")
        _check_unfinished(record, "retry")
        if record.invocation_id != delivery.invocation_id:
            raise ValueError(
                f"retry(): the record is for invocation {record.invocation_id} but the "
                f"delivery is for {delivery.invocation_id}"
            )
        seconds = check_seconds(delay, "delay", allow_zero=True)
        self._check_open()
        await self._retry(delivery, record, seconds)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give entries back at once, keeping their place at the front of the queue.

        Stale receipts are skipped. A released delivery still counts in the entry's
        ``delivery_count``; its record, if still RUNNING, waits again with the attempt
        taken back (see :meth:`Broker.release`).
        """
        checked = [_check_delivery(d) for d in _check_sequence(deliveries, "Delivery")]
        self._check_open()
        if checked:
            now = time.time()
            waiting = [
                unclaimed(d.record, now)
                if d.record is not None and d.record.status is InvocationStatus.RUNNING
                else None
                for d in checked
            ]
            await self._release(checked, waiting)

    async def watch_final(self) -> AsyncGenerator[set[str], None]:
        """Yield sets of invocation ids that reached a final status from now on.

        The iteration ends when the broker is closed. Close the iterator
        (``contextlib.aclosing``) to release what it holds promptly.
        """
        self._check_open()
        async with contextlib.aclosing(self._watch_final()) as batches:
            async for ids in batches:
                yield ids

    async def scan_records(self, batch_size: int = 500) -> AsyncIterator[list[ScannedRecord]]:
        """Yield every stored record in batches; see :meth:`Broker.scan_records`.

        :raises ConfigurationError: if *batch_size* is not an int >= 1.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be an int >= 1, got {batch_size!r:.80}")
        self._check_open()
        async for batch in self._scan_records(batch_size):
            if batch:
                yield batch

    async def counts(self) -> dict[InvocationStatus, int]:
        """Number of stored invocations per status, every status present (0 if none)."""
        self._check_open()
        found = await self._counts()
        return {status: found.get(status, 0) for status in InvocationStatus}

    async def pending_count(self, queue: str) -> int:
        """Entries of *queue* not acknowledged yet (deliverable, delayed or in flight)."""
        queue = check_name(queue, "queue name")
        self._check_open()
        return await self._pending_count(queue)

    async def close(self) -> None:
        """Release connections and threads; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        await self._close()

    # -- helpers for backends -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError(
                f"broker {self.url} is closed; open a new one with acall.brokers.open_broker()"
            )

    def _encode(self, record: InvocationRecord) -> str:
        return self._codec.to_json(record)

    def _decode(self, text: str | bytes, invocation_id: str) -> InvocationRecord:
        """Parse a stored record, reporting a damaged one as a :class:`BrokerError`."""
        try:
            return self._codec.from_json(text, InvocationRecord)
        except DTOValidationError as exc:
            raise BrokerError(
                f"the stored record of invocation {invocation_id} in {self.url} is damaged "
                f"or was written by an incompatible program: {exc}"
            ) from exc

    def _decode_unless_live(
        self, text: str | bytes, invocation_id: str
    ) -> InvocationRecord | InvocationStatus:
        """The live status a stored record's text starts with, else the record parsed.

        acall writes a record's status first (:data:`acall.dto.RECORD_HEAD`): a waiter
        polling a thousand pending records then reads a few bytes of each instead of
        parsing and validating them all. A text that does not start that way (a final
        record, another layout, a damaged one) is parsed, and a damaged one reported;
        one damaged past its head reads as live until a worker claims it (and logs it).
        """
        status = live_status(text)
        return status if status is not None else self._decode(text, invocation_id)

    def _decode_scanned(self, text: str | bytes, invocation_id: str) -> ScannedRecord:
        """Parse a record met by ``scan_records``; a damaged one becomes a DamagedRecord."""
        try:
            return self._decode(text, invocation_id)
        except BrokerError as exc:
            shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
            return DamagedRecord(invocation_id, shown, str(exc))

    def _decode_claimed(self, text: str | bytes, invocation_id: str) -> InvocationRecord | None:
        """Parse a record claimed by ``receive``; ``None`` (logged) if it is damaged.

        Raising instead would fail every later ``receive`` on the same entry, and stop
        the queue behind it.
        """
        try:
            return self._decode(text, invocation_id)
        except BrokerError as exc:
            logger.warning("delivering invocation %s without its record: %s", invocation_id, exc)
            return None

    # -- backend hooks: inputs are validated, sequences are non-empty ---------------------

    @abc.abstractmethod
    async def _submit_many(self, records: list[InvocationRecord]) -> list[InvocationRecord]:
        """Submit validated, non-final records; return stored records or duplicates."""

    @abc.abstractmethod
    async def _get_many(self, invocation_ids: list[str]) -> list[InvocationRecord | None]:
        """Return records in order, ``None`` for unknown ids."""

    async def _get_final_many(
        self, invocation_ids: list[str]
    ) -> list[InvocationRecord | InvocationStatus | None]:
        """Like :meth:`_get_many`, where a live record may be given as its status alone
        (see :meth:`_decode_unless_live`)."""
        return list(await self._get_many(invocation_ids))

    @abc.abstractmethod
    async def _find_by_call(self, call_key: str, limit: int) -> list[InvocationRecord]:
        """Records of a (well-formed) call key's invocations, oldest first, at most *limit*."""

    @abc.abstractmethod
    async def _update(self, record: InvocationRecord) -> bool:
        """Overwrite a record; return ``False`` if the invocation is unknown."""

    @abc.abstractmethod
    async def _receive(
        self,
        queues: list[str],
        max_items: int,
        consumer: str,
        visibility_timeout: float,
        wait: float,
    ) -> list[Delivery]:
        """Claim entries from distinct, valid queues, waiting up to *wait* seconds, and
        mark their non-final records RUNNING in the same atomic step."""

    @abc.abstractmethod
    async def _finish(self, outcomes: list[tuple[Delivery, InvocationRecord]]) -> None:
        """Store final records unless already final, release dedup keys, notify
        watchers, and ack current receipts: one atomic step for the whole batch."""

    @abc.abstractmethod
    async def _ack(self, delivery: Delivery) -> None:
        """Remove the entry if the receipt is current."""

    @abc.abstractmethod
    async def _extend(self, deliveries: list[Delivery], visibility_timeout: float) -> None:
        """Push back the visibility deadline of entries whose receipt is current."""

    @abc.abstractmethod
    async def _retry(self, delivery: Delivery, record: InvocationRecord, delay: float) -> None:
        """Store the record and re-enqueue the entry after *delay*, if the receipt is current."""

    @abc.abstractmethod
    async def _release(
        self, deliveries: list[Delivery], records: list[InvocationRecord | None]
    ) -> None:
        """Make entries with a current receipt deliverable now; store each one's record
        from *records* (``None``: leave it) where the stored one is still RUNNING."""

    @abc.abstractmethod
    def _watch_final(self) -> AsyncGenerator[set[str], None]:
        """Yield ids that became final; end when the broker is closed."""

    @abc.abstractmethod
    def _scan_records(self, batch_size: int) -> AsyncIterator[list[ScannedRecord]]:
        """Yield the stored records in batches of at most *batch_size*."""

    @abc.abstractmethod
    async def _counts(self) -> dict[InvocationStatus, int]:
        """Number of invocations per status (missing statuses count 0)."""

    @abc.abstractmethod
    async def _pending_count(self, queue: str) -> int:
        """Unacknowledged entries of one queue."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Release resources; called once."""
