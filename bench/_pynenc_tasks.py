"""The pynenc side of the worker benchmark: ``pynenc --app bench._pynenc_tasks runner start``.

All components on one SQLite file, ``ACALL_BENCH_PYNENC_DB`` (set by the benchmark before
it imports this module and before it starts the runner process), a ``ThreadRunner`` with
``ACALL_BENCH_CONCURRENCY`` threads, pynenc's JSON serializer and its tuned loop sleeps
(the builder's ``runner_tuning()`` defaults, 0.01 s, instead of the 0.1 s class defaults).
"""

from __future__ import annotations

import os

from pynenc.builder import PynencBuilder

app = (
    PynencBuilder()
    .app_id("acall-bench-worker")
    .sqlite(os.environ.get("ACALL_BENCH_PYNENC_DB", "/tmp/acall-bench-pynenc.db"))
    .thread_runner(min_threads=1, max_threads=int(os.environ.get("ACALL_BENCH_CONCURRENCY", "64")))
    .runner_tuning()
    .serializer_json()
    .logging_level("warning")
    .build()
)


@app.task  # type: ignore[untyped-decorator]  # pynenc ships no types here
def noop(i: int) -> int:
    """The no-op task: returns its argument."""
    return i
