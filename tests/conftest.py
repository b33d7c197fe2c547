"""Shared fixtures: a real ``redis-server`` for the session, one clean DB per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import worker_app as wa
from helpers import shared_backend_url

from acall import App
from acall.testing import RedisServer

_DATABASES = 64
# DB 0 is left alone, so a developer poking at the server by hand sees nothing surprising.
_db_numbers = itertools.cycle(range(1, _DATABASES))


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A ``redis-server`` on a free loopback port for the whole session.

    Skips the requesting test when the binary is missing, except with ``CI=true``,
    where a missing server fails: CI must run the Redis tests.
    """
    if RedisServer.find_executable() is None:
        reason = (
            "redis-server is not on PATH, so the Redis tests cannot run; install Redis "
            "(e.g. 'apt-get install redis-server' or 'brew install redis')"
        )
        if _in_ci():
            pytest.fail(f"{reason}. CI=true: a missing redis-server is a failure, not a skip.")
        pytest.skip(reason)
    with RedisServer(databases=_DATABASES) as server:
        yield server


@pytest.fixture
def persistent_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A redis-server of the requesting test alone that keeps every acknowledged write
    on disk, so it can be killed and restarted (``redis_server`` skips the test, or
    fails it under CI, without the binary)."""
    with RedisServer(executable=redis_server.executable, databases=1, persistent=True) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL of a Redis database that is empty when the test starts."""
    # The server may have been stopped or restarted by a fault test.
    redis_server.start()
    db = next(_db_numbers)
    redis_server.flushdb(db)
    return redis_server.url_for(db)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A broker (and store) URL shared across processes: a fresh SQLite file, or an
    empty Redis database."""
    return shared_backend_url(request.param, request, tmp_path)


@pytest.fixture
async def app(backend_url: str) -> AsyncIterator[App]:
    """tests/worker_app.py's app on *backend_url* (modules with an ``app`` fixture of
    their own use that one)."""
    wa.app.configure(broker=backend_url)
    async with wa.app:
        yield wa.app


# Hypothesis profiles of the fuzz tests (tests/test_fuzz_*.py, see docs/security.md),
# picked with ACALL_FUZZ_PROFILE=ci (the default) or long; tests/fuzz_support.py scales
# max_examples per test. "ci" keeps Hypothesis' own CI profile (derandomized, which
# Hypothesis loads for every test when it detects CI) and its 100 examples unchanged.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile(
    "ci", _hypothesis_settings.get_profile("ci"), max_examples=100
)
_hypothesis_settings.register_profile("long", max_examples=5_000, deadline=None)
