"""The asyncio worker: takes invocations from a broker and runs them.

For each received entry the worker reads the invocation record, rebuilds the call as a
:class:`~acall.calls.LazyCall` (no decoding), awaits its argument loads (one batched
fetch for offloaded values), runs the function — coroutines on the loop, plain
functions in threads bounded by a limiter — stores the result (large results are
offloaded like arguments) and only then acknowledges the entry.

Delivery is *at-least-once*: an entry is acknowledged after its outcome is recorded,
and while an invocation runs the worker keeps extending its visibility timeout; if the
worker dies, the entry becomes deliverable again when the timeout passes and another
worker runs it. An invocation already final when (re)delivered is acknowledged without
running again.

On SIGINT/SIGTERM the worker stops taking work and hands back the entries it holds but
has not started (its prefetch), lets running invocations finish within a grace period,
then cancels what is left and hands those entries back to the broker.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import math
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import attrs

from acall._concurrency import Wakeup
from acall._outcomes import Outcome, OutcomeWriter, ride_out
from acall.brokers.base import Delivery
from acall.calls import LazyCall
from acall.dto import ErrorInfo, InvocationRecord, InvocationStatus, succeeded
from acall.errors import (
    AcallError,
    ArgumentTypeError,
    BlobCorruptedError,
    BlobNotFoundError,
    BrokerUnavailableError,
    DeserializationError,
    InvalidKeyError,
    SerializationError,
    StoreUnavailableError,
    UnknownTaskError,
    WorkerCrashError,
)
from acall.lifecycle import BlobCollector
from acall.tasks import App, Task, error_info

__all__ = [
    "InvocationContext",
    "Worker",
    "WorkerStats",
    "current_invocation",
]

logger = logging.getLogger("acall.worker")

#: Errors that no retry can fix: the call's data (or the task's result) is broken or
#: unknown, so running the task again would only repeat its side effects.
_PERMANENT = (
    WorkerCrashError,
    SerializationError,
    ArgumentTypeError,
    BlobCorruptedError,
    BlobNotFoundError,
    DeserializationError,
    InvalidKeyError,
    UnknownTaskError,
)

#: Pause before an invocation whose arguments or result could not be reached (the store
#: is down) runs again: doubling per attempt from the first, up to the second.
_UNREACHABLE_BACKOFF: Final = (0.5, 30.0)
#: How long recording an outcome keeps trying while the broker is unreachable, at least
#: (the visibility timeout when that is longer); after that the entry is left to be
#: delivered again once the broker is back.
_OUTCOME_PATIENCE: Final = 30.0


class _Unreachable(Exception):
    """Internal: the worker itself could not reach the store for an invocation's data."""

    def __init__(self, error: StoreUnavailableError | BrokerUnavailableError) -> None:
        super().__init__(str(error))
        self.error = error


@attrs.frozen(slots=True)
class InvocationContext:
    """What a running task may want to know about its own invocation."""

    invocation_id: str
    task_key: str
    attempt: int
    max_retries: int
    worker_id: str


# The running invocation's record, task key and worker id: kept as they are, and made
# into an InvocationContext only when a task asks (most never do).
_current: contextvars.ContextVar[tuple[InvocationRecord, str, str] | None] = contextvars.ContextVar(
    "acall_current_invocation", default=None
)


def current_invocation() -> InvocationContext | None:
    """The invocation the calling task function is running for (``None`` outside one).

    Works in coroutine tasks and in plain functions run in the worker's threads.
    """
    running = _current.get()
    if running is None:
        return None
    record, task_key, worker_id = running
    return InvocationContext(
        record.invocation_id, task_key, record.attempt, record.max_retries, worker_id
    )


@attrs.define
class WorkerStats:
    """What a worker did so far."""

    received: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    duplicates: int = 0
    released: int = 0
    postponed: int = 0


class _InvocationLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the invocation id, task and call key (also as extras)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra.get('invocation_id')} {extra.get('call_key')}] {msg}", kwargs


def _log_for(record: InvocationRecord) -> _InvocationLog:
    """A logger for one invocation (made only when something is logged: hot path)."""
    call_id = record.call_id
    return _InvocationLog(
        logger,
        {
            "invocation_id": record.invocation_id,
            "task": call_id.task_id.key,
            "call_key": call_id.key,
        },
    )


_UNREACHABLE: Final = (StoreUnavailableError, BrokerUnavailableError)


class _Raised(Exception):
    """A plain task function raised, in its thread, what cannot come back as itself.

    StopIteration or StopAsyncIteration, passed through a future and a coroutine as
    itself, would become "RuntimeError: coroutine raised StopIteration"; SystemExit,
    KeyboardInterrupt or any other BaseException would end the worker. Wrapped, the
    worker records the real exception as the invocation's failure.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


def _invoke_in_thread(task: Task[Any, Any], arguments: dict[str, Any]) -> Any:
    try:
        return task.invoke(arguments)
    except (StopIteration, StopAsyncIteration) as exc:
        raise _Raised(exc) from None
    except Exception:
        raise
    except BaseException as exc:
        raise _Raised(exc) from None


def _cancelled_here(exc: BaseException) -> bool:
    """Whether *exc* is a cancellation of the running task (the worker stopping or
    cancelled), rather than a CancelledError a task function raised of its own accord."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    current = asyncio.current_task()
    return current is None or current.cancelling() > 0


class Worker:
    """Runs invocations of *app*'s tasks.

    :param concurrency: invocations running at once.
    :param prefetch: entries held beyond those running, ready for the next free
        consumer (default: as many as *concurrency*). Taking entries in larger batches
        saves broker round trips; what a worker holds stays bounded, so a long queue
        never loads into memory. Entries not started when the worker stops go back.
    :param queues: queues to consume (default: every queue of the app's tasks).
    :param threads: threads for plain (non-async) task functions (default: concurrency).
    :param visibility_timeout: seconds an entry stays invisible to other workers; it is
        extended while the invocation runs, so it only matters when a worker dies.
    :param grace_period: seconds running invocations get to finish on shutdown.
    :param poll_wait: longest wait for new entries in one broker call.
    :param max_deliveries: an entry delivered more often than this without an outcome
        (its workers died each time) fails instead of running again.
    :param handle_signals: stop gracefully on SIGINT / SIGTERM.
    :param collect_blobs: sweep unneeded blobs now and then, as the app's
        ``blob_collection`` says (no effect when that is ``None``).
    """

    def __init__(
        self,
        app: App,
        *,
        concurrency: int = 16,
        prefetch: int | None = None,
        queues: Sequence[str] | None = None,
        threads: int | None = None,
        visibility_timeout: float = 30.0,
        grace_period: float = 30.0,
        poll_wait: float = 0.5,
        max_deliveries: int = 10,
        handle_signals: bool = True,
        worker_id: str | None = None,
        collect_blobs: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if prefetch is not None and prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {max_deliveries}")
        for name, seconds, zero_ok in (
            ("visibility_timeout", visibility_timeout, False),
            ("grace_period", grace_period, True),
            ("poll_wait", poll_wait, False),
        ):
            # (Checked here, not at the first receive: a worker that cannot receive
            # would otherwise retry it forever, a warning a second.)
            if not (math.isfinite(seconds) and (seconds > 0 or (zero_ok and seconds == 0))):
                raise ValueError(
                    f"{name} must be a finite number of seconds {'>=' if zero_ok else '>'} 0, "
                    f"got {seconds}"
                )
        self.app = app
        self.concurrency = concurrency
        self.prefetch = concurrency if prefetch is None else prefetch
        self.queues = (
            tuple(queues)
            if queues
            else tuple(sorted({t.options.queue for t in app.tasks.values()} or {"default"}))
        )
        self.visibility_timeout = visibility_timeout
        self.grace_period = grace_period
        self.poll_wait = poll_wait
        self.max_deliveries = max_deliveries
        self.handle_signals = handle_signals
        self.collect_blobs = collect_blobs
        #: The blob collector this worker runs (set by :meth:`run`), if any.
        self.collector: BlobCollector | None = None
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stats = WorkerStats()
        self._threads = anyio.CapacityLimiter(threads or concurrency)
        self._inflight: dict[str, Delivery] = {}
        self._slot_freed = anyio.Event()
        self._stopping = anyio.Event()
        self._started = anyio.Event()
        self._patience = max(_OUTCOME_PATIENCE, visibility_timeout)
        # Final outcomes are recorded by a writer of their own, in batches: a consumer
        # hands its outcome over and goes on (see acall._outcomes).
        self._outcomes = OutcomeWriter(app.broker, patience=self._patience, done=self._settled)
        self._queue: collections.deque[Delivery] = collections.deque()
        # Consumers with nothing to do, each asleep on its own wake-up call, and how
        # many have been woken but not run yet (see _consume).
        self._idle: list[Wakeup] = []
        self._waking = 0
        self._no_more_work = False

    def __repr__(self) -> str:
        return (
            f"Worker({self.worker_id}, queues={list(self.queues)}, concurrency={self.concurrency})"
        )

    @property
    def started(self) -> anyio.Event:
        """Set once the worker is taking work."""
        return self._started

    def stop(self) -> None:
        """Ask the worker to stop gracefully (as SIGTERM does)."""
        self._stopping.set()
        self._slot_freed.set()

    async def run(self) -> None:
        """Take and run invocations until :meth:`stop` or a signal, then drain."""
        logger.info(
            "worker %s consuming %s (concurrency %d)",
            self.worker_id,
            list(self.queues),
            self.concurrency,
        )
        try:
            async with anyio.create_task_group() as outer:
                if self.handle_signals:
                    outer.start_soon(self._watch_signals)
                outer.start_soon(self._heartbeat)
                collection = self.app.blob_collection if self.collect_blobs else None
                if collection is not None:
                    app = self.app
                    self.collector = BlobCollector(app.broker, app.store, collection)
                    outer.start_soon(self.collector.run)
                # The outcome writer outlives the consumers: what they handed over is
                # recorded even when the grace period ran out.
                async with anyio.create_task_group() as writing:
                    writing.start_soon(self._outcomes.run)
                    try:
                        # A fixed pool of consumer tasks fed from a queue: no task is created
                        # per invocation, and at most `concurrency` entries are ever held.
                        async with anyio.create_task_group() as work:
                            for _ in range(self.concurrency):
                                work.start_soon(self._consume)
                            self._started.set()
                            try:
                                await self._receive_loop()
                            finally:
                                if self._queue:  # taken, not started: back to the broker
                                    with anyio.CancelScope(shield=True):
                                        await self._give_back_waiting()
                                self._no_more_work = True
                                while self._idle:
                                    self._wake_one()
                            await self._drain(work)
                    finally:
                        self._outcomes.close()
                outer.cancel_scope.cancel()
        finally:
            # Entries still held: received but cancelled before they started, or, when
            # the worker itself is cancelled, whose outcome was not recorded yet. Handed
            # back now, not left hidden until their visibility timeout.
            if self._inflight:
                with anyio.CancelScope(shield=True):
                    await self._give_back_all(list(self._inflight.values()))
        logger.info("worker %s stopped: %s", self.worker_id, self.stats)

    async def _consume(self) -> None:
        # Consumers are woken one at a time, each by the one before it: a consumer that
        # takes an entry and sees more waiting wakes one idle consumer (unless one is
        # already waking up). While invocations never pause (quick coroutines), one
        # consumer runs a whole batch and wakes one other; as soon as they pause (I/O),
        # every waiting entry gets a consumer of its own.
        queue = self._queue
        idle = self._idle
        wake = Wakeup()
        while True:
            if queue:
                delivery = queue.popleft()
                if queue and idle and not self._waking:
                    self._wake_one()
                await self._process(delivery)
            elif self._no_more_work:
                return
            else:
                idle.append(wake)
                try:
                    await wake.sleep()
                except BaseException:
                    if wake in idle:  # cancelled asleep
                        idle.remove(wake)
                    else:  # woken, then cancelled before it ran
                        self._waking -= 1
                    raise
                self._waking -= 1

    def _wake_one(self) -> None:
        self._waking += 1
        self._idle.pop().set()

    def _settled(self, outcomes: list[Outcome], recorded: bool) -> None:
        """The outcome writer is done with *outcomes*: free their slots, count them."""
        inflight = self._inflight
        stats = self.stats
        for delivery, record in outcomes:
            inflight.pop(delivery.receipt, None)
            if recorded:
                if record.status is InvocationStatus.SUCCESS:
                    stats.succeeded += 1
                else:
                    stats.failed += 1
        self._slot_freed.set()

    async def _give_back_all(self, deliveries: list[Delivery]) -> None:
        self._inflight.clear()  # first: see _give_back
        await self._release(deliveries)

    async def _give_back_waiting(self) -> None:
        """Hand back the entries taken but not started (the prefetched ones)."""
        waiting = list(self._queue)
        self._queue.clear()
        for delivery in waiting:
            self._inflight.pop(delivery.receipt, None)  # first: see _give_back
        await self._release(waiting)
        self._slot_freed.set()

    async def _release(self, deliveries: list[Delivery]) -> None:
        try:
            await self.app.broker.release(deliveries)
            self.stats.released += len(deliveries)
        except AcallError as exc:  # (an unreachable broker: one line, as elsewhere)
            logger.warning(
                "could not hand back %d entries (%s); they come back after their "
                "visibility timeout",
                len(deliveries),
                exc,
            )
        except Exception:
            logger.exception("could not hand back %d entries", len(deliveries))

    async def _receive_loop(self) -> None:
        # Receiving is never cancelled half-way (it waits at most poll_wait), so no entry
        # is taken and then forgotten: what arrives after a stop request goes back.
        held = self.concurrency + self.prefetch
        while not self._stopping.is_set():
            free = held - len(self._inflight)
            if free <= 0:
                self._slot_freed = anyio.Event()
                if not self._stopping.is_set():
                    await self._slot_freed.wait()
                continue
            try:
                deliveries = await self.app.broker.receive(
                    self.queues,
                    free,
                    consumer=self.worker_id,
                    visibility_timeout=self.visibility_timeout,
                    wait=self.poll_wait,
                )
            except AcallError as exc:
                logger.warning("receiving failed (%s); retrying in 1 s", exc)
                await anyio.sleep(1.0)
                continue
            if self._stopping.is_set():
                if deliveries:
                    await self._release(deliveries)
                break
            for delivery in deliveries:
                self._inflight[delivery.receipt] = delivery
                self.stats.received += 1
            if deliveries:
                self._queue.extend(deliveries)
                if self._idle and not self._waking:
                    self._wake_one()

    async def _drain(self, work: anyio.abc.TaskGroup) -> None:
        if not self._inflight:
            return
        logger.info(
            "stopping: waiting up to %.1f s for %d running invocations",
            self.grace_period,
            len(self._inflight),
        )
        with anyio.move_on_after(self.grace_period):
            while self._inflight:
                self._slot_freed = anyio.Event()
                await self._slot_freed.wait()
        if self._inflight:
            logger.warning(
                "grace period over: cancelling %d invocations; they will be redelivered",
                len(self._inflight),
            )
            work.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("received %s: stopping gracefully", signal.Signals(signum).name)
                self.stop()

    async def _heartbeat(self) -> None:
        interval = max(0.05, self.visibility_timeout / 3)
        while True:
            await anyio.sleep(interval)
            if self._inflight:
                try:
                    await self.app.broker.extend(
                        list(self._inflight.values()), self.visibility_timeout
                    )
                except AcallError as exc:
                    logger.warning("extending visibility failed: %s", exc)

    # -- one invocation --------------------------------------------------------------

    async def _process(self, delivery: Delivery) -> None:
        handed_over = False
        try:
            handed_over = await self._run_delivery(delivery)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._give_back(delivery)
            raise
        except AcallError as exc:
            # The outcome could not be recorded (the broker stayed unreachable): leave
            # the entry unacknowledged so it is delivered again.
            logger.warning(
                "invocation %s: could not record its outcome (%s); it will be delivered again",
                delivery.invocation_id,
                exc,
            )
        except Exception:
            logger.exception("invocation %s: could not record its outcome", delivery.invocation_id)
        finally:
            if not handed_over:  # else the outcome writer frees the slot once written
                self._inflight.pop(delivery.receipt, None)
                self._slot_freed.set()

    async def _give_back(self, delivery: Delivery) -> None:
        # The record waits again with this attempt not counted, in the same step: the
        # invocation was cut short by this worker's shutdown, not by its own doing (a
        # task that keeps outlasting the grace period still meets max_deliveries).
        # No longer held from here on, before the release is even sent: a heartbeat
        # meanwhile would extend it, and on Redis a receipt stays current after a
        # release, so the entry would be hidden again for a whole visibility timeout.
        self._inflight.pop(delivery.receipt, None)
        await self._release([delivery])

    async def _run_delivery(self, delivery: Delivery) -> bool:
        """Run one delivery; True if its outcome went to the outcome writer."""
        broker = self.app.broker
        # receive() already marked the invocation RUNNING (attempt + 1) atomically.
        running = delivery.record
        if running is None:
            logger.warning(
                "invocation %s has no record; dropping its entry", delivery.invocation_id
            )
            await broker.ack(delivery)
            return False
        if running.status.is_final:
            _log_for(running).info(
                "already %s (duplicate delivery); acknowledging", running.status.value
            )
            self.stats.duplicates += 1
            await broker.ack(delivery)
            return False
        # (One level check per invocation: DEBUG is enabled only where INFO is.)
        verbose = logger.isEnabledFor(logging.INFO)
        if verbose and logger.isEnabledFor(logging.DEBUG):
            _log_for(running).debug("attempt %d started", running.attempt)
        task = self.app.get_task(running.call.call_id.task_id.key)
        started = time.perf_counter()
        try:
            if delivery.delivery_count > self.max_deliveries:
                raise WorkerCrashError(
                    f"delivered {delivery.delivery_count} times without an outcome: the task "
                    "may be killing its worker (out of memory, a crash); giving up"
                )
            if task is None:
                raise UnknownTaskError(
                    f"task {running.call_id.task_id.key!r} is not registered in this "
                    "worker's app (is its module imported by the app module?)"
                )
            codec = self.app.codec
            lazy: LazyCall[Any] = LazyCall.from_dto(task.spec, codec, running.call)
            # The worker's own I/O (loading the arguments, storing the result): an
            # unreachable backend there is not an error of the task, which may raise
            # the same types itself. (Inline, not a helper: this is the hot path, where
            # the arguments and the result nearly always need no I/O: no await then.)
            arguments = lazy.arguments_now()
            if arguments is None:
                try:
                    arguments = await lazy.arguments()
                except _UNREACHABLE as exc:
                    raise _Unreachable(exc) from exc
            _current.set((running, task.key, self.worker_id))
            if task.is_async and running.timeout is None:
                value = await task.spec.invoke(arguments)
            else:
                value = await self._execute(task, running, arguments)
            serialized = codec.encode_now(value) if task.plain_result else None
            if serialized is None:
                try:
                    if not task.plain_result:
                        value = task.unstructure_result(value)
                    serialized = await codec.encode(value, name="<result>")
                except _UNREACHABLE as exc:
                    raise _Unreachable(exc) from exc
        except _Unreachable as exc:
            await self._postpone(delivery, running, exc.error)
            return False
        except _Raised as exc:
            return await self._failed(delivery, running, task, exc.original)
        except Exception as exc:
            return await self._failed(delivery, running, task, exc)
        except BaseException as exc:
            if _cancelled_here(exc):
                raise
            # From the task's own code (sys.exit(), KeyboardInterrupt, a CancelledError
            # raised with nothing cancelled): the invocation's failure, not the
            # worker's end, which would only hand the invocation to the next worker.
            return await self._failed(delivery, running, task, exc)
        self._outcomes.post(delivery, succeeded(running, serialized, time.time()))
        if verbose:
            _log_for(running).info("succeeded in %.3f s", time.perf_counter() - started)
        return True

    async def _schedule_retry(
        self,
        delivery: Delivery,
        record: InvocationRecord,
        info: ErrorInfo,
        delay: float,
        what: str,
    ) -> None:
        """Mark the invocation RETRYING with *info* and enqueue it again after *delay*."""
        now = time.time()
        retrying = attrs.evolve(
            record,
            status=InvocationStatus.RETRYING,
            error=info,
            not_before=now + delay,
            updated_at=now,
        )
        await ride_out(
            what, lambda: self.app.broker.retry(delivery, retrying, delay), self._patience
        )

    async def _postpone(
        self,
        delivery: Delivery,
        record: InvocationRecord,
        exc: StoreUnavailableError | BrokerUnavailableError,
    ) -> None:
        """The invocation's data could not be reached: no outcome, run it again later.

        Whatever its retry policy, the invocation goes back to its queue (status
        RETRYING, the error recorded) after a pause that grows with its attempts.
        """
        first, longest = _UNREACHABLE_BACKOFF
        delay = min(longest, first * 2.0 ** min(max(record.attempt - 1, 0), 16))
        delay *= random.uniform(0.75, 1.25)
        info = error_info(self.app.serializer, exc)
        await self._schedule_retry(delivery, record, info, delay, "put it back in its queue")
        self.stats.postponed += 1
        _log_for(record).warning(
            "attempt %d could not run (%s); trying again in %.2f s", record.attempt, exc, delay
        )

    async def _execute(
        self, task: Task[Any, Any], record: InvocationRecord, arguments: dict[str, Any]
    ) -> Any:
        """Run a sync task (in a thread) or one with a timeout; :meth:`_run_delivery`
        awaits a coroutine function without a timeout itself."""
        timeout = record.timeout
        with anyio.move_on_after(timeout) as scope:
            if task.is_async:
                return await task.invoke(arguments)
            # A thread cannot be interrupted: on timeout it is abandoned and its result
            # discarded; the limiter slot stays taken until it really returns.
            return await anyio.to_thread.run_sync(
                _invoke_in_thread, task, arguments, limiter=self._threads, abandon_on_cancel=True
            )
        assert scope.cancelled_caught
        raise TimeoutError(f"attempt {record.attempt} timed out after {timeout} s")

    async def _failed(
        self,
        delivery: Delivery,
        record: InvocationRecord,
        task: Task[Any, Any] | None,
        exc: BaseException,
    ) -> bool:
        """Retry or fail the invocation; True if its outcome went to the outcome writer."""
        info = error_info(self.app.serializer, exc)
        now = time.time()
        retry = (
            task is not None
            and not isinstance(exc, _PERMANENT)
            and task.options.retry.should_retry(exc, record.attempt)
        )
        if retry:
            assert task is not None
            delay = task.options.retry.delay(record.attempt)
            await self._schedule_retry(delivery, record, info, delay, "schedule its retry")
            self.stats.retried += 1
            _log_for(record).warning(
                "attempt %d failed (%s: %s); retrying in %.2f s",
                record.attempt,
                info.type_name,
                info.message,
                delay,
            )
            return False
        failed = attrs.evolve(record, status=InvocationStatus.FAILED, error=info, updated_at=now)
        self._outcomes.post(delivery, failed)
        _log_for(record).warning(
            "failed on attempt %d: %s: %s", record.attempt, info.type_name, info.message
        )
        return True
