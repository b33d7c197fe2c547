"""Worker processes started by a benchmark, always stopped (see :class:`Service`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["ROOT", "Service", "paused", "rss_kib"]

#: The repository root: worker processes run there, with it on ``PYTHONPATH``, so they
#: import the ``bench`` helper modules (and the venv's editable acall) as this process does.
ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    """The resident set size of process *pid* in KiB (``VmRSS`` of ``/proc/PID/status``)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS (a zombie?)")


class Service:
    """One process (``python -m MODULE ARGS``) in its own session, its output in a log file.

    Use it as a context manager: leaving the block stops it (SIGTERM to its process
    group, SIGKILL after ``stop_timeout`` s), whatever happened inside. :meth:`check`
    raises :class:`RuntimeError` with the end of its log if it exited.
    """

    def __init__(
        self,
        name: str,
        module: str,
        args: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", module, *args]
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            **(env or {}),
        }
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    def start(self) -> Self:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def exited(self) -> str | None:
        """``None`` while it runs; else a message with its exit status and log tail."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return (
            f"{self.name} ({' '.join(self.argv[1:])}) exited with status "
            f"{self.proc.returncode}; end of its log:\n{self.log_tail()}"
        )

    def check(self) -> None:
        message = self.exited()
        if message is not None:
            raise RuntimeError(message)

    def signal_group(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal_group(signal.SIGCONT)  # a paused process could not act on SIGTERM
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait(10)
        # Children it left behind in its group (none expected) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def paused(services: Sequence[Service]) -> Iterator[None]:
    """Stop (SIGSTOP) *services* for the block, so their idle polling takes no CPU from
    the system being timed; they continue (SIGCONT) afterwards."""
    for s in services:
        s.signal_group(signal.SIGSTOP)
    try:
        yield
    finally:
        for s in services:
            s.signal_group(signal.SIGCONT)
