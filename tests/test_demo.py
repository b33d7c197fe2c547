"""``acall demo`` as a user runs it: real processes, bad options refused in one line,
its worker stopped on SIGTERM / SIGINT, a worker that dies reported, and a Redis
outage ridden out."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import acall_cli, env

from acall.testing import RedisServer

_WORKER_LINE = re.compile(r"worker process (\d+) started")


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("acall: error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.stderr
    # Refused before any worker process was started.
    assert "worker process" not in result.stdout, result.stdout
    return lines[0]


@pytest.mark.parametrize(
    ("option", "url"),
    [("--broker", "memory://"), ("--broker", "memory://demo"), ("--store", "memory://")],
)
def test_memory_backends_are_refused(tmp_path: Path, option: str, url: str) -> None:
    # The worker is another process: it could never see an in-process backend, and the
    # demo used to wait for it forever.
    result = acall_cli("demo", option, url, "--workdir", str(tmp_path), timeout=30)
    _assert_one_line_error(result, option, url, "another process", "SQLite", "redis://")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--concurrency", "0"], "--concurrency must be 1 or more, got 0"),
        (["--concurrency", "-3"], "--concurrency must be 1 or more, got -3"),
        (["--small", "-1"], "--small must be 0 or more, got -1"),
    ],
)
def test_bad_numbers_are_refused(tmp_path: Path, args: list[str], needle: str) -> None:
    result = acall_cli("demo", *args, "--workdir", str(tmp_path), timeout=30)
    _assert_one_line_error(result, needle)


def test_unusable_workdir_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = [
        (a_file, "existing file, not a directory"),
        (a_file / "below", "Not a directory"),
    ]
    for workdir, reason in cases:
        result = acall_cli("demo", "--workdir", str(workdir), timeout=30)
        _assert_one_line_error(result, "--workdir", str(workdir), reason)
    assert a_file.read_text() == "not a directory"


# -- the demo running: real worker processes -------------------------------------------


def _pid_alive(pid: int) -> bool:
    """Whether *pid* is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


class Demo:
    """``python -m acall demo ARGS`` in a real process; its output is read as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "acall", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.worker_pid: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, needle: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first line (from now on) matching *needle*; fail after *timeout* s."""
        pattern = needle if isinstance(needle, re.Pattern) else re.compile(re.escape(needle))
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line {pattern.pattern!r} in {timeout} s: {self.lines}"
                ) from None
            if line is None:
                raise AssertionError(f"the demo ended without {pattern.pattern!r}: {self.lines}")
            self.lines.append(line)
            found = pattern.search(line)
            if found is not None:
                return found

    def wait_for_worker(self, timeout: float = 20) -> int:
        """The pid of the demo's worker process, once the demo has started it."""
        self.worker_pid = int(self.wait_for_line(_WORKER_LINE, timeout)[1])
        return self.worker_pid

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the demo to exit: ``(status, all of stdout, stderr)``."""
        assert self.proc.stderr is not None
        self.proc.wait(timeout)
        self._reader.join(10)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        return self.proc.returncode, "".join(self.lines), self.proc.stderr.read()

    def close(self) -> None:
        """Kill whatever is left: the demo, and its worker."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.worker_pid is not None and _pid_alive(self.worker_pid):
            os.kill(self.worker_pid, signal.SIGKILL)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.close()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_worker(tmp_path: Path, demos: list[Demo], signum: int) -> None:
    demo = Demo("--small", "2000", "--workdir", str(tmp_path))
    demos.append(demo)
    worker_pid = demo.wait_for_worker()
    assert _pid_alive(worker_pid)
    demo.proc.send_signal(signum)
    status, out, err = demo.finish(timeout=25)
    # A plain SIGTERM used to end the demo at once and leave its worker running.
    assert _wait_gone(worker_pid, 20), f"worker {worker_pid} outlived the demo: {out}"
    assert status == 128 + signum, (status, out, err)
    assert "summary" not in out
    assert f"interrupted by {signal.Signals(signum).name}" in err
    assert "Traceback" not in err, err


@pytest.mark.slow
def test_worker_that_dies_is_reported_in_one_line(tmp_path: Path, demos: list[Demo]) -> None:
    demo = Demo("--small", "2000", "--workdir", str(tmp_path))
    demos.append(demo)
    worker_pid = demo.wait_for_worker()
    killed_at = time.monotonic()
    os.kill(worker_pid, signal.SIGKILL)
    # Nothing would run the submitted calls any more: the demo used to poll for ever.
    status, out, err = demo.finish(timeout=25)
    assert time.monotonic() - killed_at < 15, out
    assert status == 2, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("acall: error:"), lines[0]
    assert f"worker process {worker_pid} exited early (killed by SIGKILL)" in lines[0]
    assert str(tmp_path / "worker.log") in lines[0]
    assert "summary" not in out


@pytest.mark.slow
@pytest.mark.redis
def test_redis_outage_is_ridden_out(
    persistent_redis: RedisServer, tmp_path: Path, demos: list[Demo]
) -> None:
    server = persistent_redis
    demo = Demo("--broker", server.url_for(0), "--small", "300", "--workdir", str(tmp_path))
    demos.append(demo)
    demo.wait_for_worker()
    # Submitted: the progress display runs, and the retry backoff and the slow calls
    # still take well over a second.
    demo.wait_for_line("submitted", timeout=30)
    server.kill()
    time.sleep(4.0)  # longer than the ~1.5 s that used to end the demo
    server.start()
    status, out, err = demo.finish(timeout=60)
    assert status == 0, (out, err)
    assert "progress: broker unreachable" in out
    assert "waiting" in out
    assert "summary" in out
    assert "WRONG" not in out
    assert "retry-exhausted ok 1" in out
