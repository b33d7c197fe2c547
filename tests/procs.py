"""Real processes for tests: ``acall worker`` processes to start, kill and watch, the
``acall`` command line, and the run log that the tasks of ``worker_app`` append to.

Shared by the worker process tests and the fault-injection tests.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import attrs

from acall import App
from acall.dto import InvocationRecord

TESTS_DIR = Path(__file__).parent


def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this one's, with the tests on PYTHONPATH."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), out.get("PYTHONPATH", "")])
    out.update(extra or {})
    return out


def acall_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m acall ARGS`` to completion and return what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "acall", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        check=False,
    )


class WorkerProcess:
    """``acall worker APP`` in a real process; its output goes to a file in *log_dir*."""

    def __init__(
        self,
        broker: str,
        log_dir: Path,
        *,
        app: str = "worker_app:app",
        store: str | None = None,
        concurrency: int = 8,
        visibility_timeout: float = 1.5,
        log_level: str = "WARNING",
        grace_period: float | None = None,
    ) -> None:
        self.log_path = log_dir / f"worker-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "acall", "--log-level", log_level, "worker", app]
        command += ["--broker", broker, "--concurrency", str(concurrency)]
        command += ["--visibility-timeout", str(visibility_timeout)]
        if store is not None:
            command += ["--store", store]
        if grace_period is not None:
            command += ["--grace-period", str(grace_period)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(command, env=env(), stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, whatever it is doing."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        """SIGTERM: a graceful stop; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")


class WorkerPool:
    """The worker processes of one test; those still running are killed on exit.

    :param defaults: keyword arguments of :class:`WorkerProcess` for every worker.
    """

    def __init__(self, broker: str, log_dir: Path, **defaults: object) -> None:
        self.broker = broker
        self.log_dir = log_dir
        self.defaults = defaults
        self.started: list[WorkerProcess] = []

    def start(self, **overrides: object) -> WorkerProcess:
        """Start one more worker."""
        options = {**self.defaults, **overrides}
        worker = WorkerProcess(self.broker, self.log_dir, **options)  # type: ignore[arg-type]
        self.started.append(worker)
        return worker

    def outputs(self) -> str:
        """What every worker printed, for assertion messages."""
        return "\n".join(f"--- worker {w.pid}:\n{w.output()}" for w in self.started)

    def close(self) -> None:
        """Kill whatever is still running."""
        for worker in self.started:
            if worker.alive:
                worker.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def records_of(app: App, ids: Sequence[str]) -> list[InvocationRecord | None]:
    """Records of *ids*, fetched in batches of 1000 (``None`` for unknown ones)."""
    out: list[InvocationRecord | None] = []
    for start in range(0, len(ids), 1000):
        out.extend(await app.broker.get_many(list(ids[start : start + 1000])))
    return out


async def count_finished(app: App, ids: Sequence[str]) -> int:
    """How many of *ids* reached SUCCESS or FAILED."""
    records = await records_of(app, ids)
    return sum(1 for r in records if r is not None and r.status.is_final)


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll *condition* until it holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await anyio.sleep(interval)


async def wait_finished(app: App, ids: Sequence[str], count: int, *, timeout: float) -> None:
    """Wait until at least *count* of *ids* are finished; fail after *timeout* seconds."""

    async def enough() -> bool:
        return await count_finished(app, ids) >= count

    await wait_until(enough, timeout=timeout, what=f"{count} of {len(ids)} invocations finished")


@attrs.frozen
class Run:
    """One run of a logged task: who ran it, which attempt, and its result if it ended."""

    invocation_id: str
    pid: int
    attempt: int
    result: int | None


class RunLog:
    """The file the logged tasks of ``worker_app`` append to.

    Each run writes ``start ID PID ATTEMPT`` when it begins and ``done ID PID ATTEMPT
    RESULT`` when it ends, each line with a single ``write`` to a file opened for
    appending, so lines of concurrent processes never interleave.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def read(self) -> list[tuple[str, Run]]:
        """Every line as ``(event, run)``; a line cut short by a kill is skipped."""
        if not self.path.exists():
            return []
        out: list[tuple[str, Run]] = []
        for line in self.path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) != 5 or parts[0] not in ("start", "done"):
                continue
            event, invocation_id, pid, attempt, result = parts
            value = int(result) if event == "done" else None
            out.append((event, Run(invocation_id, int(pid), int(attempt), value)))
        return out

    def finished_runs(self) -> dict[str, list[Run]]:
        """Invocation id -> its runs that ended (returned a result)."""
        runs: dict[str, list[Run]] = collections.defaultdict(list)
        for event, run in self.read():
            if event == "done":
                runs[run.invocation_id].append(run)
        return dict(runs)

    def cut_runs(self) -> list[Run]:
        """Runs that started and never ended (their worker died, or was cancelled)."""
        lines = self.read()
        ended = {(r.invocation_id, r.pid, r.attempt) for e, r in lines if e == "done"}
        return [
            run
            for event, run in lines
            if event == "start" and (run.invocation_id, run.pid, run.attempt) not in ended
        ]

    def cut_by(self, pid: int) -> int:
        """How many runs of worker *pid* were cut short."""
        return sum(1 for run in self.cut_runs() if run.pid == pid)
