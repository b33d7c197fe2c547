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

import inspect
import random
import time
import traceback
import typing
import urllib.parse
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Final, Generic, ParamSpec, Protocol, Self, TypeVar, overload

import anyio
import attrs

from acall._concurrency import GroupCommit
from acall.brokers import open_broker
from acall.brokers.base import Broker
from acall.calls import Call, ConcurrencyMode, PreSerializedCall, TaskSpec
from acall.codec import OffloadCodec, OffloadSettings
from acall.dto import (
    ErrorInfo,
    InvocationRecord,
    new_invocation_id,
    submitted,
)
from acall.errors import (
    ConfigurationError,
    InvalidArgumentsError,
    SerializationError,
)
from acall.hashing import compute_args_id
from acall.ids import TaskId
from acall.lifecycle import BlobCollection
from acall.results import InvocationHandle, ResultWatcher
from acall.serializers import JsonSerializer, Serializer
from acall.stores import Store, open_store
from acall.typed import make_argument_converter, needs_typing

__all__ = ["App", "RetryPolicy", "Task", "TaskOptions"]

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
        self._results = ResultWatcher(self.broker)
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
        return await self._results.wait(invocation_id, timeout, None)


#: Broker URL options that the store on the same URL takes too (the same SQLite file's
#: locking, the same Redis server's connection and TLS settings).
_SHARED_OPTIONS: Final = frozenset(
    {
        "lock_timeout",
        "max_threads",
        "retries",
        "socket_timeout",
        "socket_connect_timeout",
        "max_connections",
        "ssl_ca_certs",
        "ssl_cert_reqs",
    }
)


def _default_store_url(broker: Broker | str) -> str:
    """The store URL an app uses when none is given: the broker's, with the options
    both take (broker-only ones, such as ``record_ttl`` and ``prefix``, left out)."""
    if isinstance(broker, str):
        base, _, query = broker.partition("?")
        if not base.startswith(("sqlite:", "redis:", "rediss:")):
            return base
        shared = [
            (name, value)
            for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True)
            if name in _SHARED_OPTIONS
        ]
        return f"{base}?{urllib.parse.urlencode(shared)}" if shared else base
    if broker.url.startswith("memory://"):
        return "memory://"
    raise ConfigurationError(
        f"pass store= as well when giving a broker object ({broker.url}): workers in other "
        "processes must reach the same store to read offloaded values"
    )


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
        #: The task key, ``module.name``.
        self.key: str = task_id.key
        self._return_type = _return_annotation(func)
        self._return_converter = (
            make_argument_converter() if self._return_type is not None else None
        )
        #: Whether results pass as they are (no return annotation needing conversion):
        #: then :meth:`unstructure_result` and :meth:`structure_result` change nothing.
        self.plain_result = self._return_converter is None

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
        chunks: Iterator[list[PreSerializedCall[R]]] = await PreSerializedCall.batch_chunks(
            self.spec, self.app.codec, common_args or {}, params, size=_SUBMIT_BATCH
        )
        handles: list[InvocationHandle[R]] = []
        dedup_free = self.options.concurrency is ConcurrencyMode.DISABLED
        for calls in chunks:
            records = []
            for call in calls:
                await call.serialize()
                dedup_key = None if dedup_free else await self._dedup_key(call)
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
