"""Workers as real processes: SIGKILL mid-task loses nothing, SIGTERM drains, the CLI
reports bad input in one line, and ``acall demo`` runs end to end."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import worker_app as wa
from procs import RunLog, WorkerPool, acall_cli, records_of, wait_finished, wait_until

from acall import App, InvocationStatus

pytestmark = pytest.mark.slow


@pytest.fixture
def workers(backend_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    with WorkerPool(backend_url, tmp_path) as pool:
        yield pool


async def test_sigkill_mid_task_loses_nothing(
    app: App, tmp_path: Path, workers: WorkerPool
) -> None:
    log = RunLog(tmp_path / "runs.log")
    n = 200
    handles = [await wa.logged_sync.submit(i, 0.05, str(log)) for i in range(n)]
    ids = [h.invocation_id for h in handles]
    killed = []
    with anyio.fail_after(120):
        for threshold in (20, 70, 130):
            worker = workers.start()
            await wait_finished(app, ids, threshold, timeout=60)

            async def busy(pid: int = worker.pid) -> bool:
                # Finished runs are recorded in batches, so the moment a count is reached
                # may fall between batches; wait for a run of this worker under way.
                return any(run.pid == pid for run in log.cut_runs())

            await wait_until(busy, timeout=30, interval=0.002, what="a run under way")
            worker.kill()  # mid-task: at least one run is under way right now
            killed.append(worker.pid)
        workers.start()
        await wait_finished(app, ids, n, timeout=60)
    results = [await h.result(timeout=5) for h in handles]
    assert results == [wa.logged_result("sync", i) for i in range(n)]
    records = await records_of(app, ids)
    assert all(r is not None and r.status is InvocationStatus.SUCCESS for r in records)
    # Every invocation ran to completion at least once; runs cut by a kill were redone.
    assert set(log.finished_runs()) == set(ids)
    assert sum(log.cut_by(pid) for pid in killed) > 0


async def test_sigterm_lets_running_invocations_finish(app: App, workers: WorkerPool) -> None:
    handles = [await wa.slow_square.submit(i, 1.0) for i in range(4)]
    worker = workers.start()
    ids = [h.invocation_id for h in handles]
    with anyio.fail_after(30):
        while True:
            records = await app.broker.get_many(ids)
            if all(r is not None and r.status is InvocationStatus.RUNNING for r in records):
                break
            await anyio.sleep(0.02)
    assert worker.terminate() == 0, worker.output()
    statuses = {r.status for r in await app.broker.get_many(ids) if r is not None}
    assert statuses == {InvocationStatus.SUCCESS}


async def test_sigterm_past_the_grace_period_ends_a_worker_whose_thread_is_stuck(
    app: App, workers: WorkerPool, tmp_path: Path
) -> None:
    """A plain function cannot be interrupted: once the grace period is over its
    invocation is handed back, and the process exits without waiting for the thread
    (which would keep a stopped worker alive, the invocation running twice at once)."""
    handle = await wa.logged_sync.submit(1, 120, str(tmp_path / "runs.log"))
    worker = workers.start(grace_period=0.5)
    with anyio.fail_after(30):
        while (await handle.status()) is not InvocationStatus.RUNNING:
            await anyio.sleep(0.02)
    started = time.monotonic()
    assert worker.terminate() == 0, worker.output()
    assert time.monotonic() - started < 20
    assert "threads still running (task functions past the grace period" in worker.output()
    assert await handle.status() is InvocationStatus.PENDING


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    cases = [
        (["worker", "no_such_module_xyz:app"], "cannot import module"),
        (["worker", "worker_app:missing"], "is not an acall App"),
        (["worker", "broken_app:app"], "importing module 'broken_app' failed: RuntimeError"),
        (["worker", "worker_app"], "expected MODULE:APP"),
        (["worker", "worker_app:app", "--broker", "bogus://x"], "unknown"),
        (["worker", "worker_app:app", "--broker", "redis://127.0.0.1:1/0"], "127.0.0.1:1"),
        (["inspect", "0" * 32, "--broker", f"sqlite:///{tmp_path}/missing.db"], "no database"),
        (["worker", "worker_app:app", "--concurrency", "0"], "concurrency must be >= 1"),
        (["worker", "worker_app:app", "--visibility-timeout", "0"], "visibility_timeout"),
        (["worker", "worker_app:app", "--grace-period", "nan"], "grace_period"),
        (
            [
                "worker",
                "worker_app:app",
                "--broker",
                f"sqlite:///{tmp_path}/w.db",
                "--store",
                f"sqlite:///{tmp_path}/no/such/dir/s.db",
            ],
            "store",
        ),
        # The demo checks its broker and store before it starts a worker process.
        (["demo", "--broker", "redis://127.0.0.1:1/0", "--workdir", str(tmp_path)], "broker"),
        (["demo", "--store", "redis://127.0.0.1:1/0", "--workdir", str(tmp_path)], "store"),
    ]
    for args, needle in cases:
        result = acall_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("acall: error:")
        assert needle in lines[0], (args, lines[0])
        assert "Traceback" not in result.stderr
        assert "worker process" not in result.stdout, (args, result.stdout)
    assert not (tmp_path / "missing.db").exists()  # inspect reads; it creates nothing
    bad_level = acall_cli("--log-level", "loud", "worker", "worker_app:app")
    assert bad_level.returncode == 2
    assert "invalid choice: 'LOUD'" in bad_level.stderr
    assert "Traceback" not in bad_level.stderr


async def test_inspect_shows_an_invocation(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/inspect.db"
    wa.app.configure(broker=url)
    async with wa.app:
        handle = await wa.echo_size.submit("z" * 3000)
    result = acall_cli("inspect", handle.invocation_id, "--broker", url, "--resolve")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "pending"
    assert doc["arguments"] == {"blob": "z" * 3000}
    assert doc["call"]["serialized_arguments"]["blob"].startswith("__pynenc__client_data__:")
    by_key = acall_cli("inspect", doc["call"]["call_id"], "--broker", url)
    assert by_key.returncode == 0, by_key.stderr
    assert json.loads(by_key.stdout)["invocation_id"] == handle.invocation_id


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    started = time.monotonic()
    result = acall_cli("demo", "--small", "60", "--workdir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "summary" in out
    assert "WRONG" not in out
    assert "dedup hits:            1" in out
    assert "retry ok 1" in out
    assert "retry-exhausted ok 1" in out
    assert "large-arg ok 4" in out
    assert "batch ok 100" in out
    assert time.monotonic() - started < 300
