"""The acall app of the soak test (``bench/soak.py``).

Worker processes serve it as ``python -m acall worker bench._soak_tasks:app --broker URL
--store URL``; the soak client imports the same module (so task keys match), points the
app at the same backends with :meth:`acall.App.configure`, and computes every expected
result with the ``expected_*`` functions below, which the tasks themselves use.

Every task's result is a deterministic function of its arguments, so the client can
check each one. The mix covers: async no-op-ish calls, small CPU work in a worker
thread (a plain function), arguments large enough to be offloaded to the store (unique
ones and shared ones), results large enough to be offloaded, a task that fails on its
first attempt and succeeds on the retry, and a task that always fails (the client
checks the exception it gets back). Only acall and the standard library are imported.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import zlib
from typing import Final

from acall import App, BlobCollection, current_invocation

#: Environment variables the soak sets for its workers: seconds between two blob sweeps
#: of a worker, and the idle time before an unneeded blob may go (see acall.lifecycle).
SWEEP_INTERVAL_ENV: Final = "ACALL_SOAK_SWEEP_INTERVAL"
SWEEP_GRACE_ENV: Final = "ACALL_SOAK_SWEEP_GRACE"


def blob_collection(interval: float | None = None, grace: float | None = None) -> BlobCollection:
    """The app's blob collection: the arguments, else the environment, else the defaults."""
    defaults = BlobCollection()
    env_interval = os.environ.get(SWEEP_INTERVAL_ENV)
    env_grace = os.environ.get(SWEEP_GRACE_ENV)
    if interval is None:
        interval = float(env_interval) if env_interval else defaults.interval
    if grace is None:
        grace = float(env_grace) if env_grace else defaults.grace
    return BlobCollection(grace=grace, interval=interval)


#: Reconfigured by whoever uses it: ``--broker``/``--store`` for a worker, ``configure()``
#: in the soak client.
app = App("memory://bench-soak", name="bench-soak", blob_collection=blob_collection())

# Every blob sweep a worker makes is logged (at DEBUG when it deleted nothing), so the
# soak can count them in the workers' logs.
logging.getLogger("acall.lifecycle").setLevel(logging.DEBUG)

#: Characters of the values the soak offloads (well above the 1,024-character threshold).
LARGE_CHARS: Final = 4096
#: Characters of the results of :func:`wide_result` (offloaded too).
WIDE_RESULT_CHARS: Final = 3000
#: sha256 rounds of one :func:`digest` call (about 0.1 ms of CPU).
DIGEST_ROUNDS: Final = 200


class SoakFlakyError(RuntimeError):
    """Raised by :func:`flaky` on its first attempt, on purpose."""


# --------------------------------------------------------------------------- expected values


def expected_add(a: int, b: int) -> int:
    return a + b


def expected_digest(i: int, rounds: int) -> str:
    value = i.to_bytes(8, "little")
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()


def large_text(seed: int) -> str:
    """A LARGE_CHARS-character text determined by *seed* (distinct seeds, distinct texts)."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).hexdigest()  # 64 characters
    return (block * (LARGE_CHARS // len(block) + 1))[:LARGE_CHARS]


def expected_fold(i: int, text: str) -> int:
    return zlib.crc32(text.encode()) ^ i


def expected_wide(i: int) -> str:
    return (f"{i:x}-" * WIDE_RESULT_CHARS)[:WIDE_RESULT_CHARS]


def expected_flaky(i: int) -> int:
    return i * 7 + 1


def expected_summary(i: int, tags: list[str], weights: dict[str, float]) -> dict[str, object]:
    return {"i": i, "tags": sorted(tags), "total": round(sum(weights.values()), 6)}


# --------------------------------------------------------------------------- tasks


@app.task
async def add(a: int, b: int) -> int:
    """Async and almost free: the common small call."""
    return expected_add(a, b)


@app.task
def digest(i: int, rounds: int) -> str:
    """A plain function (the worker runs it in a thread): a little CPU work."""
    return expected_digest(i, rounds)


@app.task
async def fold(i: int, text: str) -> int:
    """Takes a LARGE_CHARS-character *text*: offloaded to the store, loaded by the worker."""
    return expected_fold(i, text)


@app.task
async def wide_result(i: int) -> str:
    """Returns a WIDE_RESULT_CHARS-character string: the result is offloaded."""
    return expected_wide(i)


@app.task
async def summary(i: int, tags: list[str], weights: dict[str, float]) -> dict[str, object]:
    """Structured arguments and result (lists, dicts, floats)."""
    await asyncio.sleep(0)
    return expected_summary(i, tags, weights)


@app.task(retries=2, backoff=0.05, backoff_max=0.2, retry_on=(SoakFlakyError,))
async def flaky(i: int) -> int:
    """Fails on its first attempt, succeeds on the retry."""
    ctx = current_invocation()
    if ctx is None or ctx.attempt <= 1:
        raise SoakFlakyError(f"attempt 1 of flaky({i}) fails on purpose")
    return expected_flaky(i)


@app.task
async def reject(i: int) -> None:
    """Always fails (no retries): the client checks that it gets this ValueError back."""
    raise ValueError(f"rejected {i}")


@app.task
async def whoami(pause: float) -> int:
    """The warm-up task: which worker process ran it (after *pause* seconds)."""
    await asyncio.sleep(pause)
    return os.getpid()
