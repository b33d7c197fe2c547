"""The acall app of the worker benchmark (``bench/bench_worker.py``).

Worker processes serve it as ``python -m acall worker bench._acall_tasks:app --broker URL``;
the benchmark process imports the same module (so task keys match) and points the app at
the broker with :meth:`acall.App.configure`. Nothing else is imported here, so a worker's
RSS is acall's own.
"""

from __future__ import annotations

from acall import App

#: Reconfigured by whoever uses it: ``--broker`` for a worker, ``configure()`` in the bench.
app = App("memory://bench-worker", name="bench-worker")


@app.task
async def noop(i: int) -> int:
    """The no-op task: returns its argument (so the benchmark can check every result)."""
    return i
