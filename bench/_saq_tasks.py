"""The SAQ side of the worker benchmark: ``saq bench._saq_tasks.settings``.

The queue's Redis URL comes from ``ACALL_BENCH_SAQ_URL`` (set by the benchmark, which
starts the worker process); concurrency from ``ACALL_BENCH_CONCURRENCY``.

SAQ's sweep (at worker start, then every 60 s by default) is kept out of the
benchmark's way: run while jobs flow, it aborted, as "swept", jobs that had just been
dequeued but were not marked active yet (a race in saq 0.26.4), which fails the
benchmark. So the sweep lock lasts an hour (one sweep, at startup), and the benchmark
waits for the worker to be fully started before it enqueues anything.
"""

from __future__ import annotations

import os
from typing import Any

from saq import Queue

QUEUE_NAME = "acall-bench"


async def noop(ctx: Any, *, i: int) -> int:
    """The no-op job: returns its argument."""
    return i


settings: dict[str, Any] = {
    "queue": Queue.from_url(
        os.environ.get("ACALL_BENCH_SAQ_URL", "redis://127.0.0.1:6379/2"), name=QUEUE_NAME
    ),
    "functions": [noop],
    "concurrency": int(os.environ.get("ACALL_BENCH_CONCURRENCY", "64")),
    "timers": {"sweep": 3600},
}
