"""The arq side of the worker benchmark: ``arq bench._arq_tasks.WorkerSettings``.

The Redis URL comes from ``ACALL_BENCH_ARQ_URL``, ``max_jobs`` from
``ACALL_BENCH_CONCURRENCY`` and the queue poll interval from ``ACALL_BENCH_ARQ_POLL``
(arq's default, 0.5 s, would cap it at max_jobs / 0.5 s jobs per second).
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings


async def noop(ctx: Any, i: int) -> int:
    """The no-op job: returns its argument."""
    return i


class WorkerSettings:
    functions = (noop,)
    redis_settings = RedisSettings.from_dsn(
        os.environ.get("ACALL_BENCH_ARQ_URL", "redis://127.0.0.1:6379/3")
    )
    max_jobs = int(os.environ.get("ACALL_BENCH_CONCURRENCY", "64"))
    poll_delay = float(os.environ.get("ACALL_BENCH_ARQ_POLL", "0.01"))


#: ``arq --custom-log-dict bench._arq_tasks.LOG_CONFIG``: warnings only, as for the other
#: workers (arq's default logs two lines per job at INFO).
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"arq.standard": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["arq.standard"], "level": "WARNING"}},
}
