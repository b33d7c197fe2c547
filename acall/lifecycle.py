"""Blob lifecycle: removing offloaded values that no invocation needs any more.

Offloaded arguments and results live in the data store under content references. Two
ways keep the store from growing without bound; choose per app:

* **Collection** (the default, :class:`BlobCollection`): a :class:`BlobCollector`
  traces references. A sweep reads every record the broker holds and keeps

  - the argument blobs of every invocation that is not finished (pending, running,
    retrying: they will be read again),
  - the result blob of every finished invocation whose record is still kept (the
    broker's ``record_ttl``, 7 days by default: a client may still ask for it),

  then deletes every other blob, and the chunks of large ones, **provided it has been
  idle** — neither written nor touched — for the *grace* period. The idle guard is
  what makes sweeping safe while clients submit: a client stores or touches a blob
  just before submitting the call that refers to it, and trusts its memory of a blob
  being stored only for the codec's ``reuse_window`` (a quarter of the grace period),
  so no blob about to be referenced is ever idle long enough to go (calls serialized
  by hand must likewise be submitted within that window). Every worker
  sweeps now and then (*interval*); ``acall collect`` runs one sweep by hand.
  Deleting is per key and conditional (:meth:`~acall.stores.Store.delete_idle`), so
  concurrent sweeps by several workers are harmless.

* **TTL** (:attr:`OffloadSettings.blob_ttl <acall.codec.OffloadSettings.blob_ttl>`):
  every blob expires a fixed time after it was written, with no sweeping at all. Simple,
  but a call that waits in its queue longer than the TTL loses its arguments (and fails
  with an error naming the missing reference): pick a TTL well above the longest
  queue wait plus the longest time anyone reads a result.

References found in a record the broker cannot decode are all kept: a sweep never
deletes what it cannot rule out.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import Final

import anyio
import attrs

from acall.brokers.base import Broker, DamagedRecord, ScannedRecord
from acall.codec import chunk_owner
from acall.errors import AcallError, ConfigurationError
from acall.hashing import REFERENCE_PATTERN, REFERENCE_PREFIX, is_reference
from acall.stores.base import Store

__all__ = ["LAST_SWEEP_KEY", "BlobCollection", "BlobCollector", "SweepReport", "references_of"]

logger = logging.getLogger("acall.lifecycle")

_DELETE_BATCH: Final = 1000

#: Store key holding the wall-clock time of the last sweep (shared by the workers).
LAST_SWEEP_KEY: Final = "acall.lifecycle.last-sweep"


def _check_seconds(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds, got {value!r:.80}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{what} must be a finite positive number, got {value!r}")


@attrs.frozen(slots=True)
class BlobCollection:
    """Settings of reference-tracing blob collection (see the module docs).

    :ivar grace: seconds a blob no record needs must also have been idle (not written
        or touched) before it is deleted. Bounds how long a client may take between
        storing an argument and its call being enqueued.
    :ivar interval: seconds between two sweeps of one worker (each waits a random
        part of it first, so workers started together do not sweep together).
    :ivar batch_size: records read per broker round trip while sweeping.
    """

    grace: float = 3600.0
    interval: float = 600.0
    batch_size: int = 500

    def __attrs_post_init__(self) -> None:
        _check_seconds(self.grace, "grace")
        _check_seconds(self.interval, "interval")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ConfigurationError(f"batch_size must be an int, got {self.batch_size!r:.80}")
        if self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def reuse_window(self) -> float:
        """How long a process may trust that a blob it stored is still there."""
        return self.grace / 4


#: :attr:`SweepReport.skipped` of a dry run.
DRY_RUN: Final = "dry run"


@attrs.frozen(slots=True)
class SweepReport:
    """What one sweep found and did.

    :ivar records: records read from the broker.
    :ivar damaged: records that could not be decoded (all their references kept).
    :ivar live: distinct references some record needs.
    :ivar blobs: blob keys (single blobs and chunk manifests) found in the store.
    :ivar chunks: chunk keys found in the store.
    :ivar deleted_blobs: blobs deleted (with ``dry_run``: blobs no record needs,
        whatever their idle time).
    :ivar deleted_chunks: chunks deleted (with ``dry_run``: chunks of such blobs).
    :ivar kept_recent: unneeded keys kept because they were used within the grace period.
    :ivar seconds: how long the sweep took.
    :ivar skipped: why nothing was deleted, if so (``None`` when deletion ran).
    """

    records: int
    damaged: int
    live: int
    blobs: int
    chunks: int
    deleted_blobs: int
    deleted_chunks: int
    kept_recent: int
    seconds: float
    skipped: str | None = None

    def __str__(self) -> str:
        found = (
            f"{self.records} records ({self.damaged} damaged), {self.live} live references, "
            f"{self.blobs} blobs and {self.chunks} chunks stored"
        )
        if self.skipped == DRY_RUN:
            # (Idle times are not read in a dry run: a sweep keeps the recently used.)
            return (
                f"{found}; no record needs {self.deleted_blobs} blobs and "
                f"{self.deleted_chunks} chunks: a sweep would delete those unused for the "
                f"grace period; in {self.seconds:.2f} s"
            )
        text = (
            f"{found}; deleted {self.deleted_blobs} blobs and {self.deleted_chunks} chunks, "
            f"kept {self.kept_recent} recently used, in {self.seconds:.2f} s"
        )
        return text if self.skipped is None else f"{text}; deletion skipped: {self.skipped}"


def references_of(record: ScannedRecord) -> Iterable[str]:
    """The blob references *record* still needs (see the module docs)."""
    if isinstance(record, DamagedRecord):
        return REFERENCE_PATTERN.findall(record.text)
    if record.status.is_final:
        result = record.result
        return (result,) if result is not None and is_reference(result) else ()
    return [v for v in record.call.serialized_arguments.values() if is_reference(v)]


class BlobCollector:
    """Deletes the blobs of *store* that no record of *broker* needs (see the module docs).

    :param broker: where the records are.
    :param store: where the blobs are (the app's data store).
    :param settings: grace period, interval and batch size.
    """

    def __init__(
        self, broker: Broker, store: Store, settings: BlobCollection | None = None
    ) -> None:
        self.broker = broker
        self.store = store
        self.settings = settings if settings is not None else BlobCollection()
        #: The last sweep's report, if any.
        self.last_report: SweepReport | None = None

    async def sweep(self, *, dry_run: bool = False) -> SweepReport:
        """Run one sweep and return what it found and deleted.

        :param dry_run: only count what would be deleted (nothing idle is touched).
        :raises BrokerError, StoreError: if the broker or the store fails; nothing
            is deleted then.
        """
        grace = self.settings.grace
        started = time.monotonic()
        live: set[str] = set()
        records = damaged = 0
        async for batch in self.broker.scan_records(self.settings.batch_size):
            records += len(batch)
            for record in batch:
                if isinstance(record, DamagedRecord):
                    damaged += 1
                    logger.warning(
                        "invocation %s: its record cannot be read (%s); keeping every blob "
                        "it mentions",
                        record.invocation_id,
                        record.error,
                    )
                live.update(references_of(record))
        blobs: list[str] = []
        chunks: dict[str, list[str]] = {}
        async for key in self.store.scan(REFERENCE_PREFIX):
            if is_reference(key):
                blobs.append(key)
            elif (owner := chunk_owner(key)) is not None:
                chunks.setdefault(owner, []).append(key)
        chunk_count = sum(map(len, chunks.values()))
        unneeded = [key for key in blobs if key not in live]

        def report(
            deleted: int, deleted_chunks: int, kept: int, skipped: str | None
        ) -> SweepReport:
            done = SweepReport(
                records=records,
                damaged=damaged,
                live=len(live),
                blobs=len(blobs),
                chunks=chunk_count,
                deleted_blobs=deleted,
                deleted_chunks=deleted_chunks,
                kept_recent=kept,
                seconds=time.monotonic() - started,
                skipped=skipped,
            )
            self.last_report = done
            return done

        # Safe only while the whole sweep stays well inside the grace period: a record
        # submitted after the scan began may refer to a blob it saw as unneeded, last
        # used up to a reuse window (a quarter of the grace) before that submission.
        deadline = started + grace / 2
        elapsed = time.monotonic() - started
        if elapsed > grace / 2:
            return report(
                0,
                0,
                0,
                f"scanning took {elapsed:.1f} s, more than half the grace period "
                f"({grace:g} s); raise the grace period",
            )
        if dry_run:
            orphans = [key for ref, keys in chunks.items() if ref not in live for key in keys]
            return report(len(unneeded), len(orphans), 0, DRY_RUN)
        gone = set(await self._delete_idle(unneeded, deadline))
        present = set(blobs) - gone
        # Chunks go only once their manifest is gone: a manifest touched for reuse keeps
        # its chunks, however long ago they were written.
        orphans = [
            key
            for ref, keys in chunks.items()
            if ref not in live and ref not in present
            for key in keys
        ]
        gone_chunks = await self._delete_idle(orphans, deadline)
        kept = len(unneeded) - len(gone) + len(orphans) - len(gone_chunks)
        late = time.monotonic() > deadline
        return report(
            len(gone),
            len(gone_chunks),
            kept,
            "deleting ran past half the grace period and stopped" if late else None,
        )

    async def _delete_idle(self, keys: Sequence[str], deadline: float) -> list[str]:
        gone: list[str] = []
        for start in range(0, len(keys), _DELETE_BATCH):
            if time.monotonic() > deadline:
                break
            batch = keys[start : start + _DELETE_BATCH]
            gone.extend(await self.store.delete_idle(batch, self.settings.grace))
        return gone

    async def sweep_if_due(self) -> SweepReport | None:
        """Sweep unless another collector on the same store swept within the interval.

        The time of the last sweep is kept in the store (key :data:`LAST_SWEEP_KEY`), so
        the workers of a cluster share the work instead of each reading every record
        every interval. Best effort: two collectors may still sweep at the same moment
        now and then, which is harmless (deletes are conditional per key).

        :returns: the sweep's report, or ``None`` if it was not due.
        """
        raw = await self.store.get(LAST_SWEEP_KEY)
        now = time.time()
        if raw is not None:
            try:
                last = float(raw)
            except ValueError:  # not ours to trust: sweep, and write it anew
                last = -math.inf
            if 0 <= now - last < self.settings.interval * 0.9:
                return None
        await self.store.put(LAST_SWEEP_KEY, repr(now).encode("ascii"))
        return await self.sweep()

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled; failures are logged, not raised.

        The first sweep waits a random part of the interval, so workers started
        together spread their sweeps; a sweep another worker made within the interval
        counts for all (:meth:`sweep_if_due`).
        """
        interval = self.settings.interval
        await anyio.sleep(random.uniform(0.25, 1.0) * interval)  # jitter, not security
        while True:
            try:
                done = await self.sweep_if_due()
            except AcallError as exc:
                logger.warning("blob sweep failed (retrying in %g s): %s", interval, exc)
            else:
                if done is not None:
                    level = logging.INFO if done.deleted_blobs or done.skipped else logging.DEBUG
                    logger.log(level, "blob sweep: %s", done)
            await anyio.sleep(interval)
