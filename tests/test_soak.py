"""The soak of ``bench/soak.py`` at CI size: real worker processes on a real redis-server.

5,000 invocations (async no-ops, CPU work in threads, offloaded arguments and results,
retried and failing calls) from 200 concurrent submitters through 2 worker processes,
which sweep unneeded blobs meanwhile;
every result is checked by the soak itself, and this test checks its figures: nothing
wrong, nothing lost, queues empty at the end, and peak RSS bounded. The full run
(100,000 invocations, 4 workers, 1,000 submitters) is ``python -m bench.soak``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.redis]

INVOCATIONS = 5_000
WORKERS = 2
SUBMITTERS = 200
#: Generous bounds: an idle worker takes about 40 MiB, the client about 45 MiB.
MAX_WORKER_RSS_MIB = 200
MAX_CLIENT_RSS_MIB = 300


def test_soak_ci_size(redis_url: str, tmp_path: Path) -> None:
    figures_path = tmp_path / "soak.json"
    started = time.monotonic()
    # As a separate process (warnings are errors there too): the client's RSS is the
    # soak's own, not pytest's, and `python -m bench.soak` is checked to work with
    # nothing but acall and redis-py installed.
    command = [
        sys.executable, "-W", "error", "-m", "bench.soak",
        "--redis", redis_url,
        "--invocations", str(INVOCATIONS),
        "--workers", str(WORKERS),
        "--submitters", str(SUBMITTERS),
        "--progress-every", "2",
        "--result-timeout", "60",
        "--timeout", "120",
        "--max-worker-rss", str(MAX_WORKER_RSS_MIB),
        "--max-client-rss", str(MAX_CLIENT_RSS_MIB),
        # Blob sweeps run while the load does (each worker sweeps every 0.5 s: the load
        # itself lasts a few seconds).
        "--sweep-interval", "0.5",
        "--json", str(figures_path),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    figures: dict[str, Any] = json.loads(figures_path.read_text())

    assert figures["ok"] is True, figures["failures"]
    assert figures["failures"] == []
    assert figures["invocations"] == INVOCATIONS
    assert figures["checked"] == INVOCATIONS
    assert figures["correct"] == INVOCATIONS
    assert figures["errors"] == 0
    assert figures["lost"] == 0
    # Every kind of the mix ran, the retried and failing ones included.
    assert set(figures["correct_by_kind"]) >= {
        "add", "digest", "summary", "fold", "fold-shared", "wide", "flaky", "reject",
        "batch-add", "batch-fold",
    }  # fmt: skip
    assert figures["correct_by_kind"] == figures["by_kind"]
    counts = figures["broker_counts"]
    rejects = figures["by_kind"]["reject"]
    assert counts["failed"] == rejects
    assert counts["success"] == INVOCATIONS - rejects + figures["warm_up_invocations"]
    assert counts["pending"] == counts["running"] == counts["retrying"] == 0
    assert figures["queue"] == {
        "pending_count": 0,
        "stream_entries": 0,
        "group_pending": 0,
        "inflight": 0,
        "delayed": 0,
        "dedup_keys": 0,
    }
    # Offloaded values are content-addressed: one key per distinct value, no more.
    assert 0 < figures["store"]["keys"] <= figures["offloaded_values"]
    assert figures["worker_exit_status"] == [0] * WORKERS
    assert figures["sweeps"]["count"] >= WORKERS
    assert figures["worker_log_problems"] == []
    assert figures["client_log_problems"] == []
    assert len(figures["worker_peak_rss_mib"]) == WORKERS
    assert all(0 < mib < MAX_WORKER_RSS_MIB for mib in figures["worker_peak_rss_mib"])
    assert 0 < figures["client_peak_rss_mib"] < MAX_CLIENT_RSS_MIB
    assert "soak: OK" in result.stdout
    assert "done" in result.stdout  # progress lines
    assert time.monotonic() - started < 180, "the CI soak should take well under 90 s"
