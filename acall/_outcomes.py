"""Recording a worker's final outcomes: in batches, behind the worker's back.

A worker's consumer hands each final outcome (the delivery and its SUCCESS or FAILED
record) to an :class:`OutcomeWriter` and goes on with its next delivery at once; the
writer's own task records what has piled up in one :meth:`~acall.brokers.base.Broker.finish`
call (which also acknowledges the entries). A consumer therefore never sleeps waiting
for a write, and a burst of quick invocations costs one broker call, not one each.

Delivery stays at-least-once: an entry is acknowledged only by the write that stores its
outcome, and the worker counts a handed-over outcome as in flight (its visibility kept
extended, its slot taken) until that write is done. If the write fails for good the
entry is left unacknowledged and is delivered again.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import anyio

from acall._concurrency import Wakeup
from acall.brokers.base import Broker, Delivery
from acall.dto import InvocationRecord
from acall.errors import AcallError, BrokerUnavailableError

__all__ = ["Outcome", "OutcomeWriter", "ride_out"]

logger = logging.getLogger("acall.worker")

_T = TypeVar("_T")

#: A delivery and its final record.
Outcome = tuple[Delivery, InvocationRecord]

#: Outcomes recorded in one broker call, at most.
MAX_BATCH: Final = 500


async def ride_out(what: str, write: Callable[[], Awaitable[_T]], patience: float) -> _T:
    """Run a broker write, riding out a broker that is briefly unreachable (a restart, a
    lock held by another process) for up to *patience* seconds before giving up.

    :raises BrokerUnavailableError: the last failure, once *patience* is used up.
    """
    try:
        return await write()  # the usual case: nothing else to set up (hot path)
    except BrokerUnavailableError as exc:
        error = exc
    deadline = time.monotonic() + patience
    delay = 0.1
    while True:
        if time.monotonic() + delay > deadline:
            raise error
        logger.warning("could not %s (%s); trying again in %.1f s", what, error, delay)
        await anyio.sleep(delay * random.uniform(0.75, 1.25))
        delay = min(delay * 2, 5.0)
        try:
            return await write()
        except BrokerUnavailableError as exc:
            error = exc


class OutcomeWriter:
    """Records posted outcomes in batches from its own task (:meth:`run`).

    :param broker: where outcomes are recorded.
    :param patience: seconds a batch keeps being retried while the broker is
        unreachable (see :func:`ride_out`).
    :param done: called with each batch once it is settled, and whether it was
        recorded: the worker frees the batch's slots and counts it there. Not recorded
        means the entries stay unacknowledged, to be delivered again once their
        visibility timeout passes. A batch whose write is cancelled is not settled.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        patience: float,
        done: Callable[[list[Outcome], bool], None],
    ) -> None:
        self._broker = broker
        self._patience = patience
        self._done = done
        self._posted: list[Outcome] = []
        self._wake = Wakeup()
        self._closing = False

    @property
    def pending(self) -> int:
        """Outcomes posted and not settled yet (the batch being written not included)."""
        return len(self._posted)

    def post(self, delivery: Delivery, record: InvocationRecord) -> None:
        """Hand over a final outcome; it is recorded by the writer's task soon after."""
        self._posted.append((delivery, record))
        if len(self._posted) == 1:
            self._wake.set()

    def close(self) -> None:
        """Let :meth:`run` return once every outcome posted so far is settled."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        """Write posted outcomes until :meth:`close`, then what is left, then return."""
        posted = self._posted
        finish = self._broker.finish
        while True:
            if not posted:
                if self._closing:
                    return
                await self._wake.sleep()
                continue
            batch = posted[:MAX_BATCH]
            del posted[:MAX_BATCH]
            try:
                await ride_out("record outcomes", functools.partial(finish, batch), self._patience)
            except anyio.get_cancelled_exc_class():
                # Cancelled with the worker: the batch stays posted, not settled, so the
                # worker still holds its entries and hands them back to the broker at
                # once (a stale receipt, should the write have gone through, changes
                # nothing) instead of leaving them until their visibility timeout.
                posted[:0] = batch
                raise
            except AcallError as exc:
                # The broker stayed unreachable: the entries stay unacknowledged and
                # come back once their visibility timeout passes.
                logger.warning(
                    "could not record the outcomes of %s (%s); they will be delivered again",
                    _ids(batch),
                    exc,
                )
                self._done(batch, False)
            except Exception:
                logger.exception("could not record the outcomes of %s", _ids(batch))
                self._done(batch, False)
            else:
                self._done(batch, True)


def _ids(batch: list[Outcome], shown: int = 5) -> str:
    """The invocation ids of *batch* for a log line (the first few, then a count)."""
    ids = ", ".join(delivery.invocation_id for delivery, _ in batch[:shown])
    more = len(batch) - shown
    return f"invocations {ids}" + (f" and {more} more" if more > 0 else "")
