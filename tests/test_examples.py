"""The programs in examples/ run as written and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def _run(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _run_module(module: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_fan_out_uploads_the_shared_table_once() -> None:
    out = _run("fan_out.py")
    assert "200 calls" in out
    assert "1 upload(s)" in out


def test_scrape_with_retries() -> None:
    out = _run("scrape_with_retries.py")
    assert "fetched 12 pages" in out
    assert "needed retries" in out
    assert "0 needed retries" not in out


def test_typed_pipeline() -> None:
    out = _run("typed_pipeline.py")
    assert "Report(day=datetime.date(2026, 11, 28), orders=3" in out


def test_on_redis_with_a_separate_worker_process(redis_url: str) -> None:
    """As the module docstring says: `acall worker` in one process, submit from another."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    worker = subprocess.Popen(
        [sys.executable, "-m", "acall", "worker", "examples.on_redis:app", "--broker", redis_url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = _run_module("examples.on_redis", redis_url)
    finally:
        worker.terminate()
        worker.wait(30)
    assert "word counts: [" in out
    assert "250000]" in out


def test_on_redis(redis_url: str) -> None:
    out = _run_module("examples.on_redis", redis_url, "--with-worker")
    assert "word counts: [" in out
    assert "250000]" in out
