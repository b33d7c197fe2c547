"""Apps, tasks and submission: ``@app.task``, ``await task.submit(...)``, handles.

.. code-block:: python

    app = App(broker="sqlite:///acall.db")

    @app.task(retries=3, timeout=30)
    async def resize(image: bytes, width: int) -> bytes: ...

    async with app:
        handle = await resize.submit(data, 640)
        thumbnail = await handle.result(timeout=60)

Control options of one submission are keyword arguments with a leading underscore
(``_queue``, ``_delay``, ``_timeout``), so they never collide with the task's own
parameters; a task function may not use those names.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import time
import traceback
import typing
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Generic, ParamSpec, Protocol, Self, TypeVar, overload

import anyio
import attrs

from acall._concurrency import GroupCommit, Wakeup
from acall.brokers import open_broker
from acall.brokers.base import Broker
from acall.calls import Call, ConcurrencyMode, PreSerializedCall, TaskSpec
from acall.codec import THREAD_MIN_CHARS, OffloadCodec, OffloadSettings
from acall.dto import (
    ErrorInfo,
    InvocationRecord,
    InvocationStatus,
    new_invocation_id,
    submitted,
)
from acall.errors import (
    AcallError,
    BrokerUnavailableError,
    ConfigurationError,
    DeserializationError,
    InvalidArgumentsError,
    RemoteTaskError,
    ResultTimeoutError,
    SerializationError,
    TaskError,
)
from acall.hashing import REFERENCE_PREFIX, compute_args_id
from acall.ids import TaskId
from acall.lifecycle import BlobCollection
from acall.serializers import JsonSerializer, Serializer
from acall.stores import Store, open_store
from acall.typed import make_argument_converter, needs_typing

__all__ = ["App", "InvocationHandle", "RetryPolicy", "Task", "TaskOptions"]

logger = logging.getLogger("acall.tasks")

P = ParamSpec("P")
R = TypeVar("R")

#: Keyword arguments of :meth:`Task.submit` that configure the submission itself.
CONTROL_KWARGS = frozenset({"_queue", "_delay", "_timeout"})
_SUBMIT_BATCH = 500


@attrs.frozen(slots=True)
class RetryPolicy:
    """How a failing task is retried.

    :ivar retries: retries after the first attempt (0 = never retry).
    :ivar retry_on: exception types that are retried; others fail at once.
    :ivar backoff: delay before the first retry, seconds; doubles each retry.
    :ivar backoff_max: cap on the delay.
    :ivar jitter: +/- fraction of randomness applied to each delay (spreads retries).
    """

    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    backoff: float = 1.0
    backoff_max: float = 300.0
    jitter: float = 0.25

    def __attrs_post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.backoff_max < 0:
            raise ConfigurationError("retries, backoff and backoff_max must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("jitter must be between 0 and 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after *attempt* (1-based)."""
        base = min(self.backoff_max, self.backoff * 2.0 ** max(0, attempt - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether *exc* raised by attempt number *attempt* is retried."""
        return attempt <= self.retries and isinstance(exc, self.retry_on)


@attrs.frozen(slots=True)
class TaskOptions:
    """Options of one task (see :meth:`App.task`)."""

    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None
    queue: str = "default"
    concurrency: ConcurrencyMode = ConcurrencyMode.DISABLED
    key_arguments: tuple[str, ...] = ()
    disable_offload: frozenset[str] = frozenset()


class _TaskDecorator(Protocol):
    """What ``@app.task(...)`` with options returns: it registers the function it gets.

    For a coroutine function the task's result type is what the coroutine returns.
    """

    @overload
    def __call__(self, func: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> Task[P, R]: ...


class App:
    """A broker, a data store and the tasks registered on them.

    :param broker: a :class:`~acall.brokers.base.Broker` or a URL
        (``memory://``, ``sqlite:///acall.db``, ``redis://host:6379/0``).
    :param store: where offloaded values and large results go; a
        :class:`~acall.stores.Store` or a URL. Defaults to the broker's URL (the same
        SQLite file or Redis server; a fresh in-process store for ``memory://``).
    :param serializer: defaults to the pynenc-compatible :class:`JsonSerializer`.
    :param offload: offload settings; ``min_size_to_offload`` must match on every
        process of a cluster.
    :param blob_collection: how workers remove offloaded values no invocation needs
        any more (:mod:`acall.lifecycle`); ``None`` keeps them (or leaves it to
        ``offload.blob_ttl``). Give every process of a cluster the same setting: it
        also bounds how long a client trusts its memory of stored blobs.
    :param name: shown in logs.
    """

    def __init__(
        self,
        broker: Broker | str = "sqlite:///acall.db",
        store: Store | str | None = None,
        *,
        serializer: Serializer | None = None,
        offload: OffloadSettings | None = None,
        blob_collection: BlobCollection | None = BlobCollection(),  # noqa: B008 - immutable
        name: str = "acall",
    ) -> None:
        self.name = name
        self._entered = 0
        self.serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        self._offload = offload
        self.blob_collection = blob_collection
        self.configure(broker=broker, store=store)
        self.tasks: dict[str, Task[Any, Any]] = {}

    def __repr__(self) -> str:
        return f"App({self.name!r}, broker={self.broker.url!r}, store={self.store.url!r})"

    def configure(self, *, broker: Broker | str, store: Store | str | None = None) -> None:
        """Point the app at another broker (and store) before it is used.

        This is what ``acall worker --broker URL`` does. Nothing is connected yet;
        a store defaults to the broker's URL (the same SQLite file or Redis server; a
        fresh in-process store for ``memory://``).
        """
        if self._entered:
            raise ConfigurationError("cannot reconfigure an app that is in use")
        if store is None:
            store = _default_store_url(broker)
        self.broker = open_broker(broker) if isinstance(broker, str) else broker
        self.store = open_store(store) if isinstance(store, str) else store
        collection = self.blob_collection
        self.codec = OffloadCodec(
            self.store,
            self.serializer,
            self._offload,
            reuse_window=None if collection is None else collection.reuse_window,
        )
        self._waiter = _ResultWaiter(self.broker)
        # Submissions made at the same moment (many tasks submitting at once) go to the
        # broker together: one SQLite transaction or one Redis script call per batch.
        self._submitter: GroupCommit[InvocationRecord, InvocationRecord] = GroupCommit(
            self.broker.submit_many
        )

    # -- registration ----------------------------------------------------------------

    @overload
    def task(self, func: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def task(self, func: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_on: Sequence[type[BaseException]] = (Exception,),
        backoff: float = 1.0,
        backoff_max: float = 300.0,
        jitter: float = 0.25,
        timeout: float | None = None,
        queue: str = "default",
        concurrency: ConcurrencyMode | str = ConcurrencyMode.DISABLED,
        key_arguments: Sequence[str] = (),
        disable_offload: Iterable[str] = (),
    ) -> _TaskDecorator: ...

    def task(  # type: ignore[misc]  # mypy misreads the keyword-only overload
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_on: Sequence[type[BaseException]] = (Exception,),
        backoff: float = 1.0,
        backoff_max: float = 300.0,
        jitter: float = 0.25,
        timeout: float | None = None,
        queue: str = "default",
        concurrency: ConcurrencyMode | str = ConcurrencyMode.DISABLED,
        key_arguments: Sequence[str] = (),
        disable_offload: Iterable[str] = (),
    ) -> Any:
        """Register a function (``async def`` or plain) as a task; bare or with options.

        :param name: task name (default: the function's qualified name); the task key is
            ``module.name``.
        :param retries: retries after a failed attempt, for exceptions in *retry_on*,
            waiting *backoff* seconds doubling up to *backoff_max*, +/- *jitter*.
        :param timeout: seconds an attempt may run; a coroutine is cancelled, a thread
            is abandoned (it cannot be interrupted) and the attempt fails.
        :param queue: the queue submissions go to.
        :param concurrency: ``ARGUMENTS`` or ``KEYS``: an equal call submitted while one
            is pending or running returns that invocation's handle; ``TASK``: one
            pending/running invocation of the task at a time.
        :param key_arguments: argument names identifying a call under ``KEYS``.
        :param disable_offload: argument names never offloaded (``"*"``: none).
        """
        options = TaskOptions(
            retry=RetryPolicy(retries, tuple(retry_on), backoff, backoff_max, jitter),
            timeout=timeout,
            queue=queue,
            concurrency=ConcurrencyMode(concurrency),
            key_arguments=tuple(key_arguments),
            disable_offload=frozenset(disable_offload),
        )

        def register(f: Callable[..., Any]) -> Task[Any, Any]:
            task: Task[Any, Any] = Task(self, f, options, name=name)
            if task.key in self.tasks and self.tasks[task.key].func is not f:
                raise ConfigurationError(f"a different task is already registered as {task.key!r}")
            self.tasks[task.key] = task
            return task

        return register(func) if func is not None else register

    def get_task(self, key: str) -> Task[Any, Any] | None:
        """The registered task with this key, if any."""
        return self.tasks.get(key)

    def enqueue(self, record: InvocationRecord) -> Awaitable[InvocationRecord]:
        """Store and enqueue one record; concurrent calls share one broker round trip.

        ``await app.enqueue(record)`` returns the stored record, or the existing one it
        was deduplicated against. (Not a coroutine function itself: it returns the
        batching submitter's coroutine, one frame less on every submission's path.)
        """
        # Submitting an invocation id again is harmless (the broker keeps the first),
        # so a batch whose writing task was cancelled is simply written again.
        return self._submitter.submit(record)

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Use the app; the outermost ``async with`` block closes it on exit."""
        self._entered += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the broker and the store (outermost block only)."""
        self._entered -= 1
        if not self._entered:
            await self.close()

    async def close(self) -> None:
        """Close the broker and the store."""
        with anyio.CancelScope(shield=True):
            await self.broker.close()
            await self.store.close()

    # -- results ---------------------------------------------------------------------

    def handle(self, invocation_id: str) -> InvocationHandle[Any]:
        """A handle on an existing invocation (e.g. one submitted by another process)."""
        return InvocationHandle(self, invocation_id)

    async def wait_final(self, invocation_id: str, timeout: float | None) -> InvocationRecord:
        """Wait until the invocation reaches SUCCESS or FAILED; return its record."""
        return await self._waiter.wait(invocation_id, timeout)


def _default_store_url(broker: Broker | str) -> str:
    """The store URL an app uses when none is given: the broker's, minus its options."""
    if isinstance(broker, str):
        # Query options belong to the broker (record_ttl=...); the store has its own.
        return broker.partition("?")[0]
    if broker.url.startswith("memory://"):
        return "memory://"
    raise ConfigurationError(
        f"pass store= as well when giving a broker object ({broker.url}): workers in other "
        "processes must reach the same store to read offloaded values"
    )


class _Waiter(Wakeup):
    """One awaited handle: its own wake-up call (one object per handle, not two: when
    thousands are awaited at once, the garbage collector walks each of them again and
    again), the record once final, whether its time is up, and the next waiter for the
    same invocation (the waiters of one invocation form a chain: no list per handle)."""

    __slots__ = ("expired", "next", "record")

    def __init__(self, next_waiter: _Waiter | None) -> None:
        super().__init__()
        self.record: InvocationRecord | None = None
        self.expired = False
        self.next = next_waiter

    def finished(self) -> bool:
        return self.record is not None

    def expire(self) -> None:
        self.expired = True
        self.set()


def _chain(first: _Waiter | None) -> Iterator[_Waiter]:
    while first is not None:
        yield first
        first = first.next


class _ResultWaiter:
    """Wakes every awaited handle of an app when its invocation finishes.

    One of the waiting tasks at a time is the *leader*: it reads the broker's
    ``watch_final`` stream (and polls every waited invocation now and then, since
    notifications are best effort) and wakes the others. When its own invocation
    finishes, or it is cancelled, another waiter takes over the same subscription, so
    there is no background task to start or stop and no re-subscription per handover;
    the subscription is closed when nobody waits.
    """

    POLL_EVERY = 1.0

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # Handles awaited together (gather over many) look their records up together.
        self._lookup: GroupCommit[str, InvocationRecord | None] = GroupCommit(broker.get_many)
        # Invocation id -> the first of its waiters (the others follow its chain).
        self._waiters: dict[str, _Waiter] = {}
        self._leader: _Waiter | None = None
        self._stream: AsyncGenerator[set[str], None] | None = None
        self._last_poll = -math.inf

    async def wait(self, invocation_id: str, timeout: float | None) -> InvocationRecord:
        # One coroutine for the whole wait (no helper awaited in the loop below): with
        # thousands of handles awaited at once, every frame is one more object that the
        # garbage collector walks again and again.
        waiters = self._waiters
        in_process = self.broker.reads_in_process
        if in_process:
            # No round trip: read it now, and register only if it is still to finish
            # (nothing can finish between the read and the registration: no await).
            record = self.broker.get_now(invocation_id)
            if record is not None and record.status.is_final:
                return record
        me = waiters[invocation_id] = _Waiter(waiters.get(invocation_id))
        timer: asyncio.TimerHandle | None = None
        try:
            started = anyio.current_time()
            # Registered first, then looked up: a finish in between is not missed.
            if not in_process:
                try:
                    record = await self._lookup.submit(invocation_id, me)
                except BrokerUnavailableError as exc:
                    record = await self._look_up_again(invocation_id, exc, started, timeout)
            if record is None:
                raise TaskError(f"unknown invocation {invocation_id!r}")
            if record.status.is_final:
                return record
            deadline = None if timeout is None else started + timeout
            if deadline is not None:
                # A plain loop timer wakes a waiting handle at its deadline: a cancel
                # scope per handle costs far more when thousands are awaited together.
                # Only the leader, which blocks inside the broker's stream, needs one.
                timer = asyncio.get_running_loop().call_later(
                    max(0.0, deadline - anyio.current_time()), me.expire
                )
            while me.record is None:
                if me.expired:
                    break
                if self._leader is not None:
                    await me.sleep()
                    continue
                self._leader = me
                try:
                    if deadline is None:
                        await self._lead(me)
                    else:
                        with anyio.move_on_after(deadline - anyio.current_time()):
                            await self._lead(me)
                finally:
                    self._leader = None
                    self._hand_over(me)
                if me.record is None:  # led until the deadline
                    break
            if me.record is None:
                raise ResultTimeoutError(
                    f"invocation {invocation_id} did not finish within {timeout} s "
                    "(it keeps running; call result() again to keep waiting)"
                )
            return me.record
        finally:
            if timer is not None:
                timer.cancel()
            self._forget(invocation_id, me)
            if not waiters and self._leader is None and self._stream is not None:
                stream, self._stream = self._stream, None
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

    def _forget(self, invocation_id: str, me: _Waiter) -> None:
        first = self._waiters[invocation_id]
        if first is me:
            if me.next is None:
                del self._waiters[invocation_id]
            else:
                self._waiters[invocation_id] = me.next
            return
        while first.next is not me:
            assert first.next is not None
            first = first.next
        first.next = me.next

    async def _look_up_again(
        self,
        invocation_id: str,
        error: BrokerUnavailableError,
        started: float,
        timeout: float | None,
    ) -> InvocationRecord | None:
        """Look the record up until the broker answers (it may be restarting).

        :raises BrokerUnavailableError: the latest one, if the broker is still
            unreachable when *timeout* is up.
        """
        delay = 0.1
        while True:
            if timeout is not None and anyio.current_time() + delay > started + timeout:
                raise error
            logger.warning(
                "waiting for invocation %s: %s; retrying in %.1f s", invocation_id, error, delay
            )
            await anyio.sleep(delay)
            delay = min(5.0, delay * 2)
            try:
                return await self._lookup.submit(invocation_id)
            except BrokerUnavailableError as exc:
                error = exc

    def _hand_over(self, leaving: _Waiter) -> None:
        for first in self._waiters.values():
            for waiter in _chain(first):
                if waiter.record is None and waiter is not leaving:
                    waiter.set()
                    return

    async def _lead(self, me: _Waiter) -> None:
        delay = 0.1
        while not me.finished():
            try:
                if self._stream is None:
                    self._stream = self.broker.watch_final()
                    # Its first item comes as soon as it is subscribed: checking every
                    # waited invocation then covers whatever finished before.
                    self._last_poll = -math.inf
                async for ids in self._stream:
                    now = time.monotonic()
                    if now - self._last_poll >= self.POLL_EVERY:
                        due = list(self._waiters)
                        self._last_poll = now
                    else:
                        due = [i for i in ids if i in self._waiters]
                    if due:
                        await self._check(due)
                    if me.finished():
                        return
                self._stream = None  # the broker was closed
                raise TaskError("the broker was closed while waiting for results")
            except anyio.get_cancelled_exc_class():
                # A generator interrupted mid-step cannot be resumed by the next leader.
                stream, self._stream = self._stream, None
                if stream is not None:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
                raise
            except AcallError as exc:
                if isinstance(exc, TaskError):
                    raise
                # The stream may still be open (a look-up failed, not the stream):
                # close it, and its subscription, before starting afresh.
                stream, self._stream = self._stream, None
                if stream is not None:
                    with anyio.CancelScope(shield=True):
                        await _close_quietly(stream)
                logger.warning("watching results: %s; retrying in %.1f s", exc, delay)
                await anyio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _check(self, ids: list[str]) -> None:
        for start in range(0, len(ids), 1000):
            for record in await self.broker.get_many(ids[start : start + 1000]):
                if record is not None and record.status.is_final:
                    for waiter in _chain(self._waiters.get(record.invocation_id)):
                        waiter.record = record
                        waiter.set()


async def _close_quietly(stream: AsyncGenerator[set[str], None]) -> None:
    try:
        await stream.aclose()
    except AcallError as exc:  # closing a subscription on a dead connection
        logger.debug("closing the result stream: %s", exc)


class InvocationHandle(Generic[R]):
    """A submitted invocation: its id, status, and (awaitable) result.

    :ivar invocation_id: the invocation's id.
    :ivar deduplicated: True when submission returned an equal call already pending or
        running (concurrency control) instead of creating a new invocation.
    """

    # (Thousands may be held at once: no per-handle __dict__ for the collector to walk.)
    __slots__ = ("app", "deduplicated", "invocation_id", "task")

    def __init__(
        self,
        app: App,
        invocation_id: str,
        task: Task[Any, R] | None = None,
        *,
        deduplicated: bool = False,
    ) -> None:
        self.app = app
        self.invocation_id = invocation_id
        self.task = task
        self.deduplicated = deduplicated

    def __repr__(self) -> str:
        dedup = ", deduplicated" if self.deduplicated else ""
        return f"InvocationHandle({self.invocation_id}{dedup})"

    async def record(self) -> InvocationRecord:
        """The invocation's current record."""
        record = await self.app.broker.get(self.invocation_id)
        if record is None:
            raise TaskError(f"unknown invocation {self.invocation_id!r}")
        return record

    async def status(self) -> InvocationStatus:
        """The invocation's current status."""
        return (await self.record()).status

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the outcome: the return value, or the task's exception raised here.

        :raises ResultTimeoutError: if it does not finish within *timeout* seconds.
        :raises RemoteTaskError: if the task failed with an exception that cannot be
            rebuilt safely in this process (its type and message are kept).
        """
        # (The app's waiter directly, not App.wait_final: one coroutine frame less for
        # each of the thousands of handles that may be awaited at once.)
        record = await self.app._waiter.wait(self.invocation_id, timeout)
        if record.status is not InvocationStatus.SUCCESS:
            raise rebuild_exception(self.app.serializer, record)
        text = record.result
        if text is None:
            return None  # type: ignore[return-value]
        codec = self.app.codec
        if len(text) < THREAD_MIN_CHARS and not text.startswith(REFERENCE_PREFIX):
            # Small and inline (the usual case): loaded here, one coroutine less.
            value = codec.serializer.loads(text)
        else:
            value = await codec.decode(text)
        task = self.task or self.app.get_task(record.call_id.task_id.key)
        if task is not None:
            value = task.structure_result(value)
        result: R = value
        return result


def rebuild_exception(serializer: Serializer, record: InvocationRecord) -> BaseException:
    """The exception a failed invocation raised, rebuilt safely, with its traceback noted."""
    error = record.error or ErrorInfo("RemoteTaskError", "the invocation failed without details")
    exc: BaseException | None = None
    if error.serialized is not None:
        try:
            loaded = serializer.loads(error.serialized)
        except (DeserializationError, SerializationError):
            loaded = None
        if isinstance(loaded, StopIteration | StopAsyncIteration):
            # Raised from a coroutine (handle.result()), these would turn into a bare
            # "RuntimeError: coroutine raised StopIteration": keep them as the cause.
            exc = RemoteTaskError(error.type_name, error.message)
            exc.__cause__ = loaded
        elif isinstance(loaded, BaseException):
            exc = loaded
    if exc is None:
        exc = RemoteTaskError(error.type_name, error.message)
    note = f"raised by invocation {record.invocation_id} ({record.call_id.key})"
    if error.traceback:
        note += "; remote traceback:\n" + error.traceback
    exc.add_note(note)
    return exc


def error_info(serializer: Serializer, exc: BaseException) -> ErrorInfo:
    """Describe *exc* for an invocation record (serialized when the serializer can)."""
    cls = type(exc)
    type_name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    try:
        serialized: str | None = serializer.dumps(exc)
    except SerializationError:
        serialized = None
    tb = "".join(traceback.format_exception(exc)) if exc.__traceback__ else None
    return ErrorInfo(type_name, str(exc), serialized, tb)


class Task(Generic[P, R]):
    """A registered task function. Calling it directly runs the function locally."""

    def __init__(
        self,
        app: App,
        func: Callable[P, Any],
        options: TaskOptions,
        *,
        name: str | None = None,
    ) -> None:
        self.app = app
        self.func = func
        self.options = options
        self.is_async = inspect.iscoroutinefunction(func)
        params = inspect.signature(func).parameters
        clash = CONTROL_KWARGS & params.keys()
        if clash:
            raise ConfigurationError(
                f"task function {func.__qualname__} has parameters {sorted(clash)}, which are "
                "reserved for submission options; rename them"
            )
        task_id = TaskId(func.__module__, name or func.__qualname__)
        if options.concurrency is ConcurrencyMode.KEYS and not options.key_arguments:
            raise ConfigurationError(
                f"task {task_id.key!r}: concurrency KEYS needs key_arguments=(...)"
            )
        self.spec = TaskSpec(
            func,
            task_id=task_id,
            key_arguments=options.key_arguments,
            disable_offload=options.disable_offload,
        )
        self._return_type = _return_annotation(func)
        self._return_converter = (
            make_argument_converter() if self._return_type is not None else None
        )

    @property
    def key(self) -> str:
        """The task key, ``module.name``."""
        return self.spec.key

    def __repr__(self) -> str:
        return f"Task({self.key})"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the function here, now (a coroutine function returns its coroutine)."""
        return self.func(*args, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> Call[R]:
        """Build a :class:`~acall.calls.Call` (not serialized, not submitted)."""
        return Call.from_args(self.spec, self.app.codec, *args, **kwargs)

    # -- results typing --------------------------------------------------------------

    def unstructure_result(self, value: Any) -> Any:
        """Turn a rich return value into plain data per the return annotation."""
        if self._return_converter is None:
            return value
        return self._return_converter.unstructure(value, unstructure_as=self._return_type)

    def structure_result(self, value: Any) -> Any:
        """Turn loaded result data back into the annotated return type."""
        if self._return_converter is None:
            return value
        return self._return_converter.structure(value, self._return_type)

    # -- submission ------------------------------------------------------------------

    async def submit(
        self,
        *args: Any,
        _queue: str | None = None,
        _delay: float | None = None,
        _timeout: float | None = None,
        **kwargs: Any,
    ) -> InvocationHandle[R]:
        """Serialize the call, enqueue it durably and return its handle at once.

        :param _queue: override the task's queue for this submission.
        :param _delay: seconds before the invocation may start.
        :param _timeout: override the task's timeout for this submission.
        :raises CallSerializationError: listing every argument that cannot be serialized.
        """
        call = self.call(*args, **kwargs)
        await call.serialize()
        # (No helper coroutines on this path, which every submission takes: the dedup
        # key is awaited only where concurrency control needs one.)
        dedup_key = (
            None
            if self.options.concurrency is ConcurrencyMode.DISABLED
            else await self._dedup_key(call)
        )
        record = self._record(call, _queue, _delay, _timeout, dedup_key)
        stored = await self.app.enqueue(record)
        return InvocationHandle(
            self.app,
            stored.invocation_id,
            self,
            deduplicated=stored.invocation_id != record.invocation_id,
        )

    async def submit_many(
        self,
        params: Iterable[Mapping[str, Any]],
        *,
        common_args: Mapping[str, Any] | None = None,
        _queue: str | None = None,
        _delay: float | None = None,
        _timeout: float | None = None,
    ) -> list[InvocationHandle[R]]:
        """Submit one invocation per mapping of keyword arguments in *params*.

        *common_args* are serialized (and offloaded) once and shared by every call.
        Records are enqueued in batches (one round trip per batch).
        """
        calls: list[PreSerializedCall[R]] = await PreSerializedCall.batch(
            self.spec, self.app.codec, common_args or {}, list(params)
        )
        handles: list[InvocationHandle[R]] = []
        for start in range(0, len(calls), _SUBMIT_BATCH):
            records = []
            for call in calls[start : start + _SUBMIT_BATCH]:
                await call.serialize()
                dedup_key = await self._dedup_key(call)
                records.append(self._record(call, _queue, _delay, _timeout, dedup_key))
            stored = await self.app.broker.submit_many(records)
            handles.extend(
                InvocationHandle(
                    self.app, s.invocation_id, self, deduplicated=s.invocation_id != r.invocation_id
                )
                for s, r in zip(stored, records, strict=True)
            )
        return handles

    def _record(
        self,
        call: Call[R],
        queue: str | None,
        delay: float | None,
        timeout: float | None,
        dedup_key: str | None,
    ) -> InvocationRecord:
        now = time.time()
        opts = self.options
        if delay is not None and delay < 0:
            raise InvalidArgumentsError(f"_delay must be >= 0, got {delay}")
        return submitted(
            new_invocation_id(),
            call.to_dto(),
            queue or opts.queue,
            opts.retry.retries,
            now,
            now + delay if delay else None,
            timeout if timeout is not None else opts.timeout,
            dedup_key,
        )

    async def _dedup_key(self, call: Call[R]) -> str | None:
        mode = self.options.concurrency
        if mode is ConcurrencyMode.DISABLED:
            return None
        if mode is ConcurrencyMode.TASK:
            return f"{self.key}:*"
        args = await call.serialized_args_for_concurrency_control(mode)
        return f"{self.key}:{compute_args_id(args or {})}"

    # -- running (worker side) -------------------------------------------------------

    def invoke(self, arguments: Mapping[str, Any]) -> Awaitable[Any] | Any:
        """Call the function with loaded arguments (bound by name)."""
        return self.spec.invoke(arguments)


def _return_annotation(func: Callable[..., Any]) -> Any:
    try:
        hint = typing.get_type_hints(func).get("return")
    except Exception:
        return None
    return hint if hint is not None and needs_typing(hint) else None
