"""Blob lifecycle: the collector deletes what no record needs, and never what one does."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from helpers import CountingStore

from acall import App, InvocationStatus
from acall.brokers import DamagedRecord, MemoryBroker
from acall.codec import OffloadCodec, OffloadSettings
from acall.dto import CallDTO, InvocationRecord
from acall.errors import ConfigurationError
from acall.hashing import REFERENCE_PREFIX, compute_args_id, content_reference
from acall.ids import CallId, TaskId
from acall.lifecycle import (
    LAST_SWEEP_KEY,
    BlobCollection,
    BlobCollector,
    SweepReport,
    references_of,
)
from acall.stores import MemoryStore, Store, open_store
from acall.worker import Worker

# No local text cache: the in-process worker must read every argument from the store,
# as a worker in another process would.
app = App("memory://", offload=OffloadSettings(local_cache_size=0), blob_collection=None)


@app.task
async def echo_size(blob: str, tag: int) -> str:
    # A large result: offloaded like the arguments.
    return f"{tag}:" + "r" * 4096 + blob[:10]


@app.task(queue="held")
async def held(blob: str) -> int:
    return len(blob)


def _blob(tag: object, size: int = 8192) -> str:
    return f"{tag}-{uuid.uuid4().hex}-" + "x" * size


async def _blob_keys(store: Store) -> set[str]:
    return {key async for key in store.scan(REFERENCE_PREFIX)}


async def _run_worker(worker: Worker, body: Any) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.started.wait()
        try:
            with anyio.fail_after(60):
                await body()
        finally:
            worker.stop()


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(broker URL, store URL) of one backend, empty."""
    if request.param == "memory":
        name = f"lifecycle-{uuid.uuid4().hex}"
        yield f"memory://{name}", f"memory://{name}"
        MemoryBroker.drop(name)
        MemoryStore.drop(name)
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'acall.db'}"
        yield url, url
    else:
        url = request.getfixturevalue("redis_url")
        yield url, url


@pytest.fixture
async def configured(backend: tuple[str, str]) -> AsyncIterator[App]:
    # Redis counts idle time in whole seconds (see RedisStore.delete_idle): a grace of
    # one second means "unused for two" there.
    app.blob_collection = BlobCollection(grace=1.0, interval=3600)
    app.configure(broker=backend[0], store=backend[1])
    async with app:
        yield app


def _record(status: InvocationStatus, arguments: dict[str, str], result: str | None) -> Any:
    call = CallDTO(CallId(TaskId("tests", "t"), compute_args_id(arguments)), arguments)
    return InvocationRecord(invocation_id=uuid.uuid4().hex, call=call, status=status, result=result)


def test_references_of_each_kind_of_record() -> None:
    arg_ref, result_ref = content_reference("a" * 2000), content_reference("b" * 2000)
    arguments = {"big": arg_ref, "small": "12", "text": '"__pynenc__client_data__:no"'}
    pending = _record(InvocationStatus.PENDING, arguments, None)
    retrying = attrs.evolve(pending, status=InvocationStatus.RETRYING)
    done = _record(InvocationStatus.SUCCESS, arguments, result_ref)
    failed = _record(InvocationStatus.FAILED, arguments, None)
    inline_result = _record(InvocationStatus.SUCCESS, arguments, "42")
    assert list(references_of(pending)) == [arg_ref]
    assert list(references_of(retrying)) == [arg_ref]
    # Finished: the arguments will never be read again; the result may be.
    assert list(references_of(done)) == [result_ref]
    assert list(references_of(failed)) == []
    assert list(references_of(inline_result)) == []
    damaged = DamagedRecord("x", f'{{"broken": "{arg_ref}", "also": "{result_ref}"', "bad")
    assert sorted(references_of(damaged)) == sorted([arg_ref, result_ref])


def test_settings_are_validated() -> None:
    for bad in ({"grace": 0}, {"grace": float("nan")}, {"interval": -1}, {"grace": "1"}):
        with pytest.raises(ConfigurationError):
            BlobCollection(**bad)
    with pytest.raises(ConfigurationError, match="batch_size"):
        BlobCollection(batch_size=0)
    assert BlobCollection(grace=100).reuse_window == 25


async def test_sweep_keeps_what_records_need_and_deletes_the_rest(configured: App) -> None:
    store = configured.store
    pending_blob = _blob("pending")
    pending = await held.submit(pending_blob)  # no worker takes "held" yet
    finished_blob = _blob("finished")
    handles = []

    async def body() -> None:
        handle = await echo_size.submit(finished_blob, 1)
        assert (await handle.result(timeout=30)).startswith("1:rrr")
        handles.append(handle)

    worker = Worker(configured, queues=["default"], handle_signals=False, poll_wait=0.05)
    await _run_worker(worker, body)
    # An argument stored by a client that never submitted (cancelled, crashed).
    orphan = await configured.codec.encode(_blob("orphan"), name="blob")
    keys = await _blob_keys(store)
    finished_ref = content_reference(configured.serializer.dumps(finished_blob))
    pending_ref = content_reference(configured.serializer.dumps(pending_blob))
    assert {orphan, finished_ref, pending_ref} <= keys
    assert len(keys) == 4  # and the result

    collector = BlobCollector(configured.broker, store, configured.blob_collection)
    # Just written: nothing is idle yet, so nothing goes, whatever the records say.
    fresh = await collector.sweep()
    assert (fresh.deleted_blobs, fresh.kept_recent, fresh.skipped) == (0, 2, None)
    assert await _blob_keys(store) == keys
    await anyio.sleep(2.5)
    dry = await collector.sweep(dry_run=True)
    assert (dry.deleted_blobs, dry.skipped) == (2, "dry run")
    assert await _blob_keys(store) == keys
    report = await collector.sweep()
    assert report.records == 2
    assert report.live == 2
    assert report.blobs == 4
    assert report.deleted_blobs == 2
    assert report.skipped is None
    assert "deleted 2 blobs" in str(report)
    left = await _blob_keys(store)
    assert left == keys - {orphan, finished_ref}
    assert pending_ref in left
    # The finished call's result is still readable; the pending call still runs.
    assert (await handles[0].result(timeout=5)).startswith("1:rrr")

    async def run_held() -> None:
        assert await pending.result(timeout=30) == len(pending_blob)

    await _run_worker(Worker(configured, handle_signals=False, poll_wait=0.05), run_held)


async def test_long_run_store_stays_bounded_and_needed_blobs_stay(tmp_path: Path) -> None:
    """Rounds of calls with fresh large arguments and results, swept by the worker.

    Finished records expire quickly (record_ttl), so their results become collectable
    too; a call waiting all along in an unserved queue keeps its argument throughout.
    """
    url = f"sqlite:///{tmp_path / 'long.db'}"
    app.blob_collection = BlobCollection(grace=0.3, interval=0.2)
    app.configure(broker=f"{url}?record_ttl=0.5", store=url)
    rounds, per_round = 80, 10
    sizes: list[int] = []
    async with app:
        waiting_blob = _blob("waiting")
        waiting = await held.submit(waiting_blob)
        waiting_ref = content_reference(app.serializer.dumps(waiting_blob))
        worker = Worker(app, queues=["default"], handle_signals=False, poll_wait=0.02)

        async def body() -> None:
            for round_no in range(rounds):
                handles = [
                    await echo_size.submit(_blob(round_no), round_no) for _ in range(per_round)
                ]
                for handle in handles:
                    assert (await handle.result(timeout=30)).startswith(f"{round_no}:rrr")
                keys = await _blob_keys(app.store)
                assert waiting_ref in keys, f"round {round_no}: a needed blob was deleted"
                sizes.append(len(keys))
                await anyio.sleep(0.05)

        await _run_worker(worker, body)
        assert worker.collector is not None
        assert worker.collector.last_report is not None
        written = rounds * per_round * 2  # an argument and a result per call
        # Without collection the store would hold every one of them; with it, about
        # what a grace period's worth of rounds wrote.
        assert max(sizes[rounds // 2 :]) < written // 5, sizes
        # No growth trend: the last quarter holds no more than the first half did.
        assert max(sizes[3 * rounds // 4 :]) <= 1.5 * max(sizes[: rounds // 2]) + 20, sizes
        # The call that waited all along still runs with its argument.
        late = Worker(app, queues=["held"], handle_signals=False, poll_wait=0.02)

        async def run_waiting() -> None:
            assert await waiting.result(timeout=30) == len(waiting_blob)

        await _run_worker(late, run_waiting)


async def test_chunks_go_with_their_manifest_and_stay_with_a_needed_one() -> None:
    store, broker = MemoryStore(), MemoryBroker()
    codec = OffloadCodec(store, settings=OffloadSettings(chunk_size=1024))
    needed = await codec.encode(_blob("needed", 5000), name="a")
    unneeded = await codec.encode(_blob("unneeded", 5000), name="b")
    # Chunks of an upload that never got its manifest written (a cancelled client).
    orphan_ref = content_reference("never finished")
    await store.put_many({f"{orphan_ref}:0": b"x" * 1024, f"{orphan_ref}:1": b"y"})
    arguments = {"a": needed}
    call = CallDTO(CallId(TaskId("tests", "t"), compute_args_id(arguments)), arguments)
    await broker.submit(InvocationRecord(invocation_id=uuid.uuid4().hex, call=call))
    chunk_keys = {key async for key in store.scan(f"{needed}:")}
    assert len(chunk_keys) >= 5
    collector = BlobCollector(broker, store, BlobCollection(grace=0.2))
    await anyio.sleep(0.3)
    report = await collector.sweep()
    assert report.deleted_blobs == 1
    assert report.deleted_chunks == report.chunks - len(chunk_keys)
    assert await _blob_keys(store) == {needed} | chunk_keys
    assert await codec.decode(needed) == (await codec.decode(needed))
    fresh = OffloadCodec(store)  # no local cache: reads every chunk again
    assert (await fresh.decode(needed)).startswith("needed-")
    assert unneeded not in await _blob_keys(store)


async def test_a_reused_blob_is_touched_once_the_reuse_window_passes() -> None:
    store = CountingStore()
    codec = OffloadCodec(store, reuse_window=0.2)
    big = _blob("big", 2 * 1024 * 1024)
    small = _blob("small", 4096)
    for value in (big, small):
        await codec.encode(value, name="v")
    store.reset()
    for value in (big, small):
        await codec.encode(value, name="v")
    assert sum(store.calls.values()) == 0, "within the window: trusted, no round trip"
    await anyio.sleep(0.25)
    for value in (big, small):
        await codec.encode(value, name="v")
    # Past it: the large blob is touched (not uploaded again), the small one rewritten;
    # either way its idle time starts again before a record can refer to it.
    assert store.calls["touch_many"] == 1
    assert store.calls["put"] == 1
    store.reset()
    forever = OffloadCodec(store)
    await forever.encode(small, name="v")
    await anyio.sleep(0.25)
    await forever.encode(small, name="v")
    assert store.calls["put"] == 1


class _SlowScanStore(MemoryStore):
    """A real memory store whose key scan takes a while (a huge store, a slow link)."""

    async def _scan(self, prefix: str) -> AsyncIterator[str]:
        await anyio.sleep(0.3)
        async for key in super()._scan(prefix):
            yield key


async def test_a_sweep_slower_than_half_the_grace_deletes_nothing() -> None:
    store, broker = _SlowScanStore(), MemoryBroker()
    codec = OffloadCodec(store)
    ref = await codec.encode(_blob("unneeded"), name="v")
    await anyio.sleep(0.5)
    report = await BlobCollector(broker, store, BlobCollection(grace=0.4)).sweep()
    assert report.deleted_blobs == 0
    assert report.skipped is not None
    assert "grace period" in report.skipped
    assert await store.exists(ref)
    assert isinstance(report, SweepReport)


@app.task
async def first_char(blob: str, n: int) -> str:
    return blob[0] + str(n)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_sweeping_hard_while_clients_reuse_blobs_loses_nothing(
    kind: str, tmp_path: Path
) -> None:
    """Clients reuse a few large values in bursts (trusted from memory, then stored
    again) while sweeps run back to back: no call ever finds its argument gone."""
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'race.db'}"
    settings = BlobCollection(grace=0.4, interval=3600)
    app.blob_collection = settings
    app.configure(broker=url, store=url if kind == "sqlite" else None)
    shared = [_blob(letter, 20_000) for letter in "abc"]
    async with app:
        collector = BlobCollector(app.broker, app.store, settings)
        sweeps: list[SweepReport] = []
        done = anyio.Event()

        async def sweep_forever() -> None:
            while not done.is_set():
                sweeps.append(await collector.sweep())
                await anyio.sleep(0.01)

        async def client(number: int) -> None:
            for i in range(100):
                # Bursts: each value is used for a while, then left idle past the
                # grace period (and deleted), then used again.
                value = shared[(i // 20) % len(shared)]
                handle = await first_char.submit(value, i)
                assert await handle.result(timeout=30) == value[0] + str(i)
                await anyio.sleep(0.02)

        async def body() -> None:
            async with anyio.create_task_group() as sweeping:
                sweeping.start_soon(sweep_forever)
                async with anyio.create_task_group() as clients:
                    for number in range(4):
                        clients.start_soon(client, number)
                done.set()

        worker = Worker(app, queues=["default"], handle_signals=False, poll_wait=0.02)
        await _run_worker(worker, body)
    assert len(sweeps) > 20
    # Blobs did become unneeded and idle between uses, and were deleted meanwhile.
    assert sum(report.deleted_blobs for report in sweeps) > 0


async def test_acall_collect_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    async with open_store(url) as store:
        orphan = await OffloadCodec(store).encode(_blob("orphan"), name="v")
    await anyio.sleep(1.2)

    def collect(*options: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "acall", "collect", "--broker", url, *options]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    dry = collect("--grace", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout
    assert "no record needs 1 blobs" in dry.stdout
    assert "deleted" not in dry.stdout  # (nothing was: only counted)
    async with open_store(url) as store:
        assert await store.exists(orphan)
    real = collect("--grace", "1")
    assert real.returncode == 0, real.stderr
    assert "deleted 1 blobs" in real.stdout
    async with open_store(url) as store:
        assert not await store.exists(orphan)
    bad = collect("--grace", "0")
    assert bad.returncode == 2
    assert "grace" in bad.stderr
    assert "Traceback" not in bad.stderr


async def test_collectors_on_one_store_share_the_sweeps() -> None:
    store, broker = MemoryStore(), MemoryBroker()
    settings = BlobCollection(grace=60, interval=0.3)
    first, second = BlobCollector(broker, store, settings), BlobCollector(broker, store, settings)
    assert await first.sweep_if_due() is not None
    # Another worker's sweep within the interval counts for this one too.
    assert await second.sweep_if_due() is None
    assert await first.sweep_if_due() is None
    await anyio.sleep(0.35)
    assert await second.sweep_if_due() is not None
    assert await first.sweep_if_due() is None
    # Whatever else sits under the key is no reason to stop sweeping.
    await store.put(LAST_SWEEP_KEY, b"not a time")
    assert await first.sweep_if_due() is not None
    stamp = await store.get(LAST_SWEEP_KEY)
    assert stamp is not None
    assert abs(float(stamp) - time.time()) < 5


class _SlowDeleteStore(MemoryStore):
    """A real memory store whose conditional deletes take a while (a slow link)."""

    async def _delete_idle(self, keys: Sequence[str], idle: float) -> list[str]:
        await anyio.sleep(0.3)
        return await super()._delete_idle(keys, idle)


async def test_deleting_stops_at_half_the_grace_period() -> None:
    store, broker = _SlowDeleteStore(), MemoryBroker()
    refs = [content_reference(f"value {i}") for i in range(1500)]
    await store.put_many(dict.fromkeys(refs, b"blob"))
    await anyio.sleep(0.45)
    report = await BlobCollector(broker, store, BlobCollection(grace=0.4)).sweep()
    # The first batch of 1,000 started in time; the next one would have started late.
    assert report.deleted_blobs == 1000
    assert report.skipped is not None
    assert "stopped" in report.skipped
    assert len(await _blob_keys(store)) == 500
