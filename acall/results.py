"""Handles and results: ``handle.result()`` and the watcher that settles it.

:meth:`InvocationHandle.result` returns a :class:`ResultFuture`: an asyncio future that
settles with the invocation's outcome, and that can also be run as a coroutine. So
``await handle.result()``, ``asyncio.gather(*(h.result() for h in handles))``,
``asyncio.create_task(handle.result())`` and ``task_group.start_soon(handle.result)``
all work; ``gather`` and ``wait_for`` take the future as it is, with no task per handle.

One :class:`ResultWatcher` per app settles the futures of every handle awaited in it:
a single background task reads the broker's ``watch_final`` notifications (and, where
notifications are best effort, polls every waited invocation now and then) and settles
the futures of the invocations that finished. It runs while somebody waits and closes
its subscription when nobody does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from anyio.lowlevel import checkpoint

from acall.brokers.base import Broker
from acall.codec import THREAD_MIN_CHARS
from acall.dto import ErrorInfo, InvocationRecord, InvocationStatus
from acall.errors import (
    AcallError,
    BrokerUnavailableError,
    DeserializationError,
    RemoteTaskError,
    ResultTimeoutError,
    SerializationError,
    TaskError,
)
from acall.hashing import REFERENCE_PREFIX
from acall.serializers import Serializer

if TYPE_CHECKING:
    from acall.tasks import App, Task

__all__ = ["InvocationHandle", "ResultFuture", "ResultWatcher", "rebuild_exception"]

logger = logging.getLogger("acall.results")

R = TypeVar("R")

#: Records read per broker call when checking waited invocations.
_CHECK_BATCH = 1000


class ResultFuture(asyncio.Future[R], Coroutine[Any, Any, R]):
    """The outcome of one invocation, as :meth:`InvocationHandle.result` returns it.

    An asyncio future: awaiting it returns the task's return value or raises its
    exception (rebuilt safely), :class:`~acall.errors.ResultTimeoutError` once the
    timeout given to ``result()`` has passed (counted from that call), or another
    :class:`~acall.errors.TaskError` (an unknown invocation, a closed broker).
    Cancelling it stops the wait, not the invocation.

    It also follows the coroutine protocol, so APIs that insist on a coroutine
    (``asyncio.create_task``, anyio's ``start_soon``) accept it as well.
    """

    # (Thousands may wait at once: slots, and one object per waiting handle.)
    __slots__ = ("_handle", "_invocation_id", "_iterator", "_next", "_timer", "_watcher")

    def __init__(
        self,
        watcher: ResultWatcher,
        invocation_id: str,
        handle: InvocationHandle[R] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(loop=loop)
        self._watcher = watcher
        self._invocation_id = invocation_id
        #: ``None``: settle with the final record itself (App.wait_final).
        self._handle = handle
        #: The next future waiting for the same invocation (a chain: no list per id).
        self._next: ResultFuture[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._iterator: Generator[Any, None, R] | None = None

    @property
    def invocation_id(self) -> str:
        """The id of the invocation this is the outcome of."""
        return self._invocation_id

    def cancel(self, msg: Any | None = None) -> bool:
        """Stop waiting (the invocation itself goes on)."""
        if not super().cancel(msg):
            return False
        self._watcher._leave(self)
        return True

    # -- the coroutine protocol, for APIs that want a coroutine ------------------------

    def _iterate(self) -> Generator[Any, None, R]:
        iterator = self._iterator
        if iterator is None:
            iterator = self._iterator = asyncio.Future.__await__(self)
        return iterator

    def send(self, value: Any) -> Any:
        """Advance the wait as a coroutine would (what a task running it calls)."""
        return self._iterate().send(value)

    def throw(
        self,
        typ: type[BaseException] | BaseException,
        val: BaseException | object = None,
        tb: TracebackType | None = None,
    ) -> Any:
        """Raise an exception inside the wait as a coroutine would."""
        if val is None and tb is None:
            return self._iterate().throw(typ)
        return self._iterate().throw(typ, val, tb)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the coroutine side. A wait not over yet is cancelled, as closing a
        coroutine abandons it (a task group cancelled before the task started)."""
        if self._iterator is not None:
            self._iterator.close()
        if not self.done():
            self.cancel()


class ResultWatcher:
    """Settles the result futures of one app as their invocations finish.

    The futures wait in a dict keyed by invocation id (those of one invocation in a
    chain). A background task subscribes to the broker's ``watch_final`` while any
    future waits, checks the ids it reports (and, for brokers whose notifications are
    best effort, every waited id each :attr:`POLL_EVERY` seconds) and settles the
    futures of those that are final. On brokers read with a round trip, a second task
    first looks each new id up (it may have finished before it was waited for) and
    starts the subscription only for those still to finish: waiting for results one at
    a time, each already final, costs a look-up each and no subscription.
    """

    POLL_EVERY = 1.0

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, ResultFuture[Any]] = {}
        # Ids waited for and not looked up yet (brokers read with a round trip).
        self._fresh: list[str] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._lookup_task: asyncio.Task[None] | None = None
        self._decoding: set[asyncio.Task[None]] = set()
        # The last failure to reach the broker, for the message of a timeout.
        self._trouble: str | None = None

    def wait(
        self, invocation_id: str, timeout: float | None, handle: InvocationHandle[R] | None
    ) -> ResultFuture[R]:
        """A future settled with the outcome of *invocation_id* (see :class:`ResultFuture`)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._adopt(loop)
        future: ResultFuture[R] = ResultFuture(self, invocation_id, handle, loop)
        broker = self.broker
        if broker.reads_in_process:
            # Read it now, and wait only if it is still to finish (nothing can finish
            # between the read and the registration: no await in between).
            try:
                record = broker.get_now(invocation_id)
            except AcallError as exc:
                future.set_exception(exc)
                return future
            if record is None:
                future.set_exception(_unknown(invocation_id))
                return future
            if record.status.is_final:
                self._settle(future, record)
                return future
        else:
            # It may have finished already, or before a subscription could see it: it
            # is looked up first (the look-up starts the watcher if it is still to
            # finish).
            self._fresh.append(invocation_id)
            if self._lookup_task is None:
                self._lookup_task = loop.create_task(self._look_up())
        if timeout is not None:
            future._timer = loop.call_later(max(0.0, timeout), self._expire, future, timeout)
        future._next = self._waiting.get(invocation_id)
        self._waiting[invocation_id] = future
        if broker.reads_in_process and self._watch_task is None:
            self._start_watching()
        return future

    # -- settling ----------------------------------------------------------------------

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start afresh on *loop*: what waited on an earlier loop cannot be awaited now."""
        self._loop = loop
        self._waiting = {}
        self._fresh = []
        self._watch_task = self._lookup_task = None
        self._decoding = set()

    def _finished(self, record: InvocationRecord) -> None:
        """Settle every future waiting for *record*'s invocation."""
        future = self._waiting.pop(record.invocation_id, None)
        while future is not None:
            following, future._next = future._next, None
            self._settle(future, record)
            future = following

    def _fail(self, invocation_id: str, error: BaseException) -> None:
        future = self._waiting.pop(invocation_id, None)
        while future is not None:
            following, future._next = future._next, None
            _disarm(future)
            if not future.done():
                future.set_exception(error)
            future = following

    def _fail_all(self, error: BaseException) -> None:
        for invocation_id in list(self._waiting):
            self._fail(invocation_id, error)

    def _settle(self, future: ResultFuture[Any], record: InvocationRecord) -> None:
        if future._timer is not None:
            _disarm(future)
        if future.done():  # cancelled meanwhile
            return
        handle = future._handle
        if handle is None:
            future.set_result(record)
            return
        if record.status is not InvocationStatus.SUCCESS:
            future.set_exception(rebuild_exception(handle.app.serializer, record))
            return
        text = record.result
        if text is None:
            future.set_result(None)
        elif len(text) < THREAD_MIN_CHARS and not text.startswith(REFERENCE_PREFIX):
            # Small and inline (the usual case): loaded here, no task.
            try:
                value = handle.app.codec.serializer.loads(text)
                task = handle.task
                if task is None or not task.plain_result:
                    value = handle._structure(value, record)
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(value)
        else:
            decoding = asyncio.get_running_loop().create_task(
                self._decode(future, handle, text, record)
            )
            self._decoding.add(decoding)
            decoding.add_done_callback(self._decoding.discard)

    async def _decode(
        self,
        future: ResultFuture[Any],
        handle: InvocationHandle[Any],
        text: str,
        record: InvocationRecord,
    ) -> None:
        """Settle *future* with a result that is offloaded or large (read from the
        store, or decoded in a thread)."""
        try:
            value = handle._structure(await handle.app.codec.decode(text), record)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(value)

    def _expire(self, future: ResultFuture[Any], timeout: float) -> None:
        future._timer = None
        if future.done():
            return
        self._leave(future)
        message = (
            f"invocation {future.invocation_id} did not finish within {timeout} s "
            "(it keeps running; call result() again to keep waiting)"
        )
        if self._trouble is not None:
            message += f"; the broker could not be read meanwhile: {self._trouble}"
        future.set_exception(ResultTimeoutError(message))

    def _leave(self, future: ResultFuture[Any]) -> None:
        """Take *future* out of its chain (cancelled or timed out)."""
        _disarm(future)
        invocation_id = future.invocation_id
        first = self._waiting.get(invocation_id)
        if first is future:
            if future._next is None:
                del self._waiting[invocation_id]
            else:
                self._waiting[invocation_id] = future._next
        else:
            while first is not None and first._next is not future:
                first = first._next
            if first is None:  # settled already, or waited on an earlier loop
                return
            first._next = future._next
        future._next = None
        if not self._waiting and self._watch_task is not None:
            # Nobody waits: end the subscription now rather than at its next item.
            task, self._watch_task = self._watch_task, None
            task.cancel()

    # -- the background tasks ----------------------------------------------------------

    def _start_watching(self) -> None:
        if self._watch_task is None and self._waiting:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Settle waited futures from the broker's notifications, while any waits."""
        me = asyncio.current_task()
        delay = 0.1
        try:
            while self._waiting:
                stream = self.broker.watch_final()
                try:
                    if await self._follow(stream):
                        return
                except BrokerUnavailableError as exc:
                    self._trouble = str(exc)
                    logger.warning("watching results: %s; retrying in %.1f s", exc, delay)
                except AcallError as exc:  # the broker is closed, or cannot be watched
                    self._fail_all(exc)
                    return
                else:  # the stream ended: the broker was closed
                    self._fail_all(TaskError("the broker was closed while waiting for results"))
                    return
                finally:
                    with anyio.CancelScope(shield=True):
                        await _close_quietly(stream)
                await anyio.sleep(delay)
                delay = min(5.0, delay * 2)
        except Exception as exc:
            # No future may wait forever on a watcher that is gone.
            logger.exception("watching results failed")
            self._fail_all(exc)
        finally:
            if self._watch_task is me:
                self._watch_task = None

    async def _follow(self, stream: AsyncGenerator[set[str], None]) -> bool:
        """Settle futures from *stream* until nobody waits (True) or it ends (False)."""
        # Its first item comes as soon as it is subscribed: checking every waited id
        # then covers whatever finished before (and what a lookup would have found).
        last_poll = -math.inf
        polling = not self.broker.reads_in_process  # in process, no notice is lost
        subscribed = False
        async for ids in stream:
            if not subscribed:
                subscribed = True
                self._fresh.clear()  # about to be checked
                due = list(self._waiting)
                last_poll = time.monotonic()
            elif polling and time.monotonic() - last_poll >= self.POLL_EVERY:
                due = list(self._waiting)
                last_poll = time.monotonic()
            else:
                waiting = self._waiting
                due = [i for i in ids if i in waiting]
            if due:
                await self._check(due)
                self._trouble = None
            if not self._waiting:
                if self._watch_task is asyncio.current_task():
                    self._watch_task = None
                return True
        return False

    async def _look_up(self) -> None:
        """Look up newly waited ids (brokers read with a round trip), then watch for
        those still to finish."""
        delay = 0.1
        try:
            while self._fresh:
                fresh, self._fresh = self._fresh, []
                due = [i for i in fresh if i in self._waiting]
                try:
                    await self._check(due)
                except BrokerUnavailableError as exc:
                    self._trouble = str(exc)
                    logger.warning("looking up results: %s; retrying in %.1f s", exc, delay)
                    self._fresh[:0] = due
                    await anyio.sleep(delay)
                    delay = min(5.0, delay * 2)
                except Exception as exc:  # no future may wait on a lookup that failed
                    logger.exception("looking up results failed")
                    for invocation_id in due:
                        self._fail(invocation_id, exc)
                else:
                    self._trouble = None
                self._start_watching()
        finally:
            self._lookup_task = None

    async def _check(self, ids: list[str]) -> None:
        """Settle the futures of those of *ids* that are final; fail those of unknown or
        unreadable ones."""
        for start in range(0, len(ids), _CHECK_BATCH):
            if start:
                # In-process reads never wait: let the loop run between batches.
                await checkpoint()
            chunk = ids[start : start + _CHECK_BATCH]
            for invocation_id, found in zip(chunk, await self._records(chunk), strict=True):
                if isinstance(found, BaseException):
                    self._fail(invocation_id, found)
                elif found is None:
                    self._fail(invocation_id, _unknown(invocation_id))
                elif isinstance(found, InvocationRecord) and found.status.is_final:
                    self._finished(found)

    async def _records(self, ids: list[str]) -> list[_Found]:
        """The records of *ids* where final (live ones may be given as their status).
        When a batch cannot be read for another reason than an unreachable broker (a
        malformed record, a closed broker), each id is read alone and gets its own
        error: one bad record fails only its own waiters."""
        broker = self.broker
        try:
            if broker.reads_in_process:
                return [broker.get_now(i) for i in ids]
            return list(await broker.get_final_many(ids))
        except BrokerUnavailableError:
            raise
        except AcallError as exc:
            if len(ids) == 1:
                return [exc]
            found: list[_Found] = []
            for invocation_id in ids:
                found.extend(await self._records([invocation_id]))
            return found


#: What the watcher reads for one id: a record, a live status, an error, or unknown.
_Found = InvocationRecord | InvocationStatus | AcallError | None


def _disarm(future: ResultFuture[Any]) -> None:
    timer = future._timer
    if timer is not None:
        future._timer = None
        timer.cancel()


def _unknown(invocation_id: str) -> TaskError:
    return TaskError(f"unknown invocation {invocation_id!r}")


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
            raise _unknown(self.invocation_id)
        return record

    async def status(self) -> InvocationStatus:
        """The invocation's current status."""
        return (await self.record()).status

    def result(self, timeout: float | None = None) -> ResultFuture[R]:
        """The outcome, to await: the return value, or the task's exception raised there.

        Returns a :class:`ResultFuture` (an asyncio future that can also run as a
        coroutine). The timeout counts from this call.

        :raises ResultTimeoutError: if it does not finish within *timeout* seconds.
        :raises RemoteTaskError: if the task failed with an exception that cannot be
            rebuilt safely in this process (its type and message are kept).
        """
        return self.app._results.wait(self.invocation_id, timeout, self)

    def _structure(self, value: Any, record: InvocationRecord) -> R:
        """A loaded result converted to the task's return annotation, where it has one."""
        task = self.task or self.app.get_task(record.call_id.task_id.key)
        if task is not None and not task.plain_result:
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
            # Set on a future or raised from a coroutine, these would turn into a bare
            # TypeError or "RuntimeError: coroutine raised StopIteration": keep them as
            # the cause.
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
