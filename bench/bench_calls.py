"""``calls``: acall's async calls vs pynenc 0.4.0's call objects, in one process.

Both sides build a call, serialize its arguments (offloading large ones to an in-memory
store), compute its ``args_id`` and its DTO:

* acall: ``Call.from_args(spec, codec, ...)``, ``await call.serialize()``,
  ``call.args_id``, ``call.to_dto()``, on an :class:`~acall.OffloadCodec` over a
  ``MemoryStore`` with acall's pynenc-compatible :class:`~acall.JsonSerializer`;
* pynenc: ``Call(task, Arguments(kwargs))``, ``.serialized_arguments``, ``.args_id``,
  ``.to_dto()``, on a ``Pynenc`` app configured with its ``JsonSerializer`` and its
  ``MemClientDataStore`` (same 1024-character offload threshold as acall). pynenc gets
  its arguments already bound by name; acall binds positional ones to the signature.

Before anything is timed, the two must agree: the same serialized arguments, the same
``args_id`` and, for offloaded values, the same reference key (both hash the same
serialized text) and byte-identical stored text.

Offload figures start cold every time: acall gets a fresh store and codec per call (a
codec remembers what it uploaded, and a store that already holds a large blob is not
written again), pynenc's store is purged. The async side runs inside one event loop
(an :class:`asyncio.Runner` kept for the whole group); fast calls are timed in batches of
:data:`SMALL_BATCH` inside one coroutine, pynenc's in the same batches in a plain loop.

The lazy-load figure reads from a real ``redis-server`` (started here); the loop-stall
figures run a 1 ms heartbeat coroutine beside the work and report the longest gap. Their
100 MB fixtures (220,000 containers for the dicts) are frozen out of the garbage
collector before the rounds: otherwise the collector's walk over the benchmark's own
test data, started by whichever allocation comes next, lands in a round as a stall of
tens of milliseconds that neither contender's code causes.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

from acall import Call, JsonSerializer, LazyCall, OffloadCodec, PreSerializedCall, TaskSpec
from acall.dto import CallDTO
from acall.hashing import REFERENCE_PREFIX
from acall.stores import Store, open_store
from acall.stores.memory import MemoryStore
from acall.testing import RedisServer
from bench._support import Heartbeat, per_item, versus_limit
from bench.bench_identity import _PARAGRAPH
from bench.bench_serializer import make_records
from bench.harness import (
    BenchError,
    Contender,
    Figure,
    Settings,
    Target,
    compare,
    group,
    measure,
)

GROUP = "calls"

T = TypeVar("T")

#: Small calls timed per harness call (one coroutine / one plain loop running this many).
SMALL_BATCH = 200
#: Calls of the shared-argument batch figure.
SHARED_CALLS = 1000
#: The heartbeat of the loop-stall figures, and the longest stall allowed.
HEARTBEAT_S = 0.001
STALL_LIMIT_MS = 20.0


# --------------------------------------------------------------------------- task functions
# Module level, as pynenc requires: both sides derive the same task id from them.


def small_task(user_id: int, greeting: str, items: list[int]) -> None:
    """Three small arguments."""


def big_task(payload: Any) -> None:
    """One (large) argument."""


def four_task(a: Any, b: Any, c: Any, d: Any) -> None:
    """Four (large) arguments."""


def shared_task(data: Any, i: int) -> None:
    """A large shared argument and a small own one."""


def eight_task(a0: Any, a1: Any, a2: Any, a3: Any, a4: Any, a5: Any, a6: Any, a7: Any) -> None:
    """Eight (large) arguments."""


# --------------------------------------------------------------------------- inputs

_SERIALIZER = JsonSerializer()


def text_of_size(size: int, tag: str = "") -> str:
    """Mixed text (non-ASCII included) whose serialized JSON is about ``size`` bytes."""
    unit = len(_SERIALIZER.dumps(_PARAGRAPH)) - 2
    return tag + _PARAGRAPH * max(1, size // unit)


def serialized_bytes(value: Any) -> int:
    """UTF-8 bytes of the value's serialized text (what an offload hashes and stores)."""
    return len(_SERIALIZER.dumps(value).encode("utf-8"))


# --------------------------------------------------------------------------- pynenc side


class _Pynenc:
    """A pynenc app with in-memory components, its JSON serializer and memory store."""

    def __init__(self) -> None:
        try:
            from pynenc import Pynenc
            from pynenc.arguments import Arguments
            from pynenc.call import Call as PCall
            from pynenc.call import PreSerializedCall as PPreSerializedCall
        except ImportError as exc:
            raise BenchError(f"pynenc missing ({exc}); run the benchmarks with bench/run") from exc
        self.Arguments = Arguments
        self.Call = PCall
        self.PreSerializedCall = PPreSerializedCall
        self.app = Pynenc(
            config_values={
                "app_id": "acall-bench-calls",
                "serializer_cls": "JsonSerializer",
                "client_data_store_cls": "MemClientDataStore",
                "min_size_to_cache": 1024,
                "warn_threshold": 10**12,  # no warning per 100 MB value
                "logging_level": "error",
            }
        )
        self.store = self.app.client_data_store
        self.tasks: dict[str, Any] = {}

    def task(self, func: Callable[..., Any]) -> Any:
        if func.__name__ not in self.tasks:
            self.tasks[func.__name__] = self.app.task(func)
        return self.tasks[func.__name__]

    def call(self, func: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
        """serialized arguments + args_id + DTO of one call; returns the DTO."""
        call = self.Call(self.task(func), self.Arguments(dict(kwargs)))
        call.serialized_arguments  # noqa: B018  (serializes and offloads)
        call.args_id  # noqa: B018
        return call.to_dto()

    def cold_call(self, func: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
        self.store.purge()
        return self.call(func, kwargs)

    def stored_text(self, ref: str) -> str:
        text = self.store._retrieve(ref)
        assert isinstance(text, str)
        return text


# --------------------------------------------------------------------------- acall side


class _Acall:
    """TaskSpecs and calls on a memory store, inside one long-lived event loop."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner
        self.specs: dict[str, TaskSpec] = {}
        self.codec = OffloadCodec(MemoryStore(), _SERIALIZER)

    def spec(self, func: Callable[..., Any]) -> TaskSpec:
        if func.__name__ not in self.specs:
            self.specs[func.__name__] = TaskSpec(func)
        return self.specs[func.__name__]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    @staticmethod
    async def call(spec: TaskSpec, codec: OffloadCodec, kwargs: Mapping[str, Any]) -> CallDTO:
        call: Call[Any] = Call.from_args(spec, codec, **kwargs)
        await call.serialize()
        call.args_id  # noqa: B018
        return call.to_dto()

    def cold_call(self, func: Callable[..., Any], kwargs: Mapping[str, Any]) -> CallDTO:
        """A call on a fresh store and codec (nothing uploaded yet): a real offload."""
        codec = OffloadCodec(MemoryStore(), _SERIALIZER)
        self.codec = codec  # kept, so the check after a run can read the blobs back
        return self.run(self.call(self.spec(func), codec, kwargs))

    def stored_text(self, ref: str) -> str:
        return self.run(self.codec.fetch_texts([ref]))[ref]


def _check_same(
    what: str, acall_dto: CallDTO, pynenc_dto: Any, acall: _Acall, pynenc: _Pynenc
) -> None:
    """Abort unless both calls serialized to the same arguments, id and stored texts."""
    a_args = dict(acall_dto.serialized_arguments)
    p_args = dict(pynenc_dto.serialized_arguments)
    if a_args != p_args:
        diff = sorted(k for k in a_args.keys() | p_args.keys() if a_args.get(k) != p_args.get(k))
        raise BenchError(f"{what}: serialized arguments differ for {diff}")
    if acall_dto.call_id.args_id != pynenc_dto.call_id.args_id:
        raise BenchError(
            f"{what}: args_id differs: acall {acall_dto.call_id.args_id}, "
            f"pynenc {pynenc_dto.call_id.args_id}"
        )
    if acall_dto.call_id.task_id.key != pynenc_dto.call_id.task_id.key:
        raise BenchError(f"{what}: task keys differ")
    for name, value in a_args.items():
        if value.startswith(REFERENCE_PREFIX) and (
            acall.stored_text(value) != pynenc.stored_text(value)
        ):
            raise BenchError(f"{what}: stored text of argument {name!r} differs")


# --------------------------------------------------------------------------- figures


@group(GROUP, "async calls vs pynenc calls: small, offloaded 10 MB, shared, lazy, loop stalls")
def bench_calls(settings: Settings) -> Iterator[Figure]:
    pynenc = _Pynenc()
    with asyncio.Runner() as runner:
        acall = _Acall(runner)
        yield from _small(settings, acall, pynenc)
        yield from _offload(settings, acall, pynenc)
        yield from _shared(settings, acall, pynenc)
        yield from _lazy(settings, acall)
        yield from _stalls(settings, acall, pynenc)


def _small(settings: Settings, acall: _Acall, pynenc: _Pynenc) -> Iterator[Figure]:
    """3 small args: serialize + args_id + DTO per call."""
    spec = acall.spec(small_task)
    codec = acall.codec
    kwargs = {"user_id": 42, "greeting": "hello", "items": [1, 2, 3]}

    async def acall_batch(k: int) -> None:
        for _ in range(k):
            call: Call[Any] = Call.from_args(spec, codec, 42, "hello", [1, 2, 3])
            await call.serialize()
            call.args_id  # noqa: B018
            call.to_dto()

    ptask = pynenc.task(small_task)
    PCall, Arguments = pynenc.Call, pynenc.Arguments

    def pynenc_batch(k: int) -> None:
        for _ in range(k):
            call = PCall(ptask, Arguments({"user_id": 42, "greeting": "hello", "items": [1, 2, 3]}))
            call.serialized_arguments  # noqa: B018
            call.args_id  # noqa: B018
            call.to_dto()

    _check_same(
        "3 small args",
        acall.run(acall.call(spec, codec, kwargs)),
        pynenc.call(small_task, kwargs),
        acall,
        pynenc,
    )
    timings = measure(
        [
            Contender("acall", lambda k: acall.runner.run(acall_batch(k)), SMALL_BATCH),
            Contender("pynenc", pynenc_batch, SMALL_BATCH),
        ],
        settings,
    )
    per_call = {name: per_item(t, SMALL_BATCH) for name, t in timings.items()}
    yield compare(
        GROUP,
        "3 small args: ser+args_id+DTO",
        per_call,
        "acall",
        "pynenc",
        metric="rate",
        target=Target(
            ">=", 3, "acall calls/s >= 3x pynenc's (3 small args: serialize, args_id, DTO)"
        ),
    )


def _cold_pair(
    what: str,
    func: Callable[..., Any],
    kwargs: Mapping[str, Any],
    acall: _Acall,
    pynenc: _Pynenc,
) -> tuple[list[Contender], int]:
    """Contenders for a cold offload of ``kwargs``, checked to agree; and the bytes per call."""
    acall_dto = acall.cold_call(func, kwargs)
    pynenc_dto = pynenc.cold_call(func, kwargs)
    if not all(v.startswith(REFERENCE_PREFIX) for v in acall_dto.serialized_arguments.values()):
        raise BenchError(f"{what}: acall did not offload every argument")
    _check_same(what, acall_dto, pynenc_dto, acall, pynenc)
    nbytes = sum(serialized_bytes(v) for v in kwargs.values())
    return [
        Contender("acall", lambda kw: acall.cold_call(func, kw), kwargs),
        Contender("pynenc", lambda kw: pynenc.cold_call(func, kw), kwargs),
    ], nbytes


def _offload(settings: Settings, acall: _Acall, pynenc: _Pynenc) -> Iterator[Figure]:
    """10 MB arguments offloaded to the memory store: one str, four strs, dicts."""
    # Each payload is built just before its figure and dropped after it (10-40 MB each).
    cases: list[tuple[str, str, Callable[..., Any], Callable[[], dict[str, Any]], float, str]] = [
        (
            "1 x 10 MB str",
            "offload 1 x 10 MB str",
            big_task,
            lambda: {"payload": text_of_size(10_000_000)},
            1.3,
            "acall MB/s >= 1.3x pynenc's (one 10 MB str offloaded)",
        ),
        (
            "4 x 10 MB str",
            "offload 4 x 10 MB str, one call",
            four_task,
            lambda: {name: text_of_size(10_000_000, tag=f"{name}:") for name in "abcd"},
            1.6,
            "acall MB/s >= 1.6x pynenc's (four 10 MB strs in one call)",
        ),
        (
            "10 MB dicts",
            "offload 10 MB dicts",
            big_task,
            lambda: {"payload": make_records(10_000_000)},
            5,
            "acall MB/s >= 5x pynenc's (10 MB list of small dicts offloaded)",
        ),
    ]
    for what, figure, func, make, ratio, target in cases:
        contenders, nbytes = _cold_pair(what, func, make(), acall, pynenc)
        yield compare(
            GROUP,
            figure,
            measure(contenders, settings),
            "acall",
            "pynenc",
            metric="mbps",
            nbytes=nbytes,
            target=Target(">=", ratio, target),
        )
        del contenders


def _shared(settings: Settings, acall: _Acall, pynenc: _Pynenc) -> Iterator[Figure]:
    """1,000 calls sharing one 1 MB argument (serialized and offloaded once per batch).

    The targeted line shares a 1 MB str, whose one-off encoding costs both sides about
    the same, so it measures the per-call machinery; the line after it shares 1 MB of
    small dicts, where acall's faster encoder of the shared value also counts (info).
    """
    shared_values: list[tuple[str, Any, Target | None]] = [
        (
            "str",
            text_of_size(1_000_000),
            Target(">=", 2, "acall calls/s >= 2x pynenc's (1,000 calls sharing a 1 MB str)"),
        ),
        ("dicts", make_records(1_000_000), None),
    ]
    for label, value, target in shared_values:
        yield _shared_one(settings, acall, pynenc, label, {"data": value}, target)


def _shared_one(
    settings: Settings,
    acall: _Acall,
    pynenc: _Pynenc,
    label: str,
    common: Mapping[str, Any],
    target: Target | None,
) -> Figure:
    own = [{"i": i} for i in range(SHARED_CALLS)]
    spec = acall.spec(shared_task)

    async def acall_batch(_: object) -> list[CallDTO]:
        codec = OffloadCodec(MemoryStore(), _SERIALIZER)
        acall.codec = codec
        calls: list[PreSerializedCall[Any]] = await PreSerializedCall.batch(
            spec, codec, common, own
        )
        dtos = []
        for call in calls:
            await call.serialize()
            call.args_id  # noqa: B018
            dtos.append(call.to_dto())
        return dtos

    ptask = pynenc.task(shared_task)
    PPre = pynenc.PreSerializedCall

    def pynenc_batch(_: object) -> list[Any]:
        pynenc.store.purge()
        shared = pynenc.store.serialize_arguments(dict(common), ptask.conf.disable_cache_args)
        dtos = []
        for kwargs in own:
            call = PPre(
                ptask, common_args=dict(common), common_serialized_args=shared, other_args=kwargs
            )
            call.serialized_arguments  # noqa: B018
            call.args_id  # noqa: B018
            dtos.append(call.to_dto())
        return dtos

    what = f"1,000 calls sharing 1 MB {label}"
    acall_dtos = acall.runner.run(acall_batch(None))
    pynenc_dtos = pynenc_batch(None)
    if len(acall_dtos) != len(pynenc_dtos):
        raise BenchError(f"{what}: different numbers of calls")
    if not acall_dtos[0].serialized_arguments["data"].startswith(REFERENCE_PREFIX):
        raise BenchError(f"{what}: the shared argument was not offloaded")
    for i in (0, 1, SHARED_CALLS - 1):
        _check_same(f"{what}, call {i}", acall_dtos[i], pynenc_dtos[i], acall, pynenc)
    timings = measure(
        [
            Contender("acall", lambda a: acall.runner.run(acall_batch(a))),
            Contender("pynenc", pynenc_batch),
        ],
        settings,
    )
    per_call = {name: per_item(t, SHARED_CALLS) for name, t in timings.items()}
    return compare(
        GROUP,
        f"1,000 calls sharing 1 MB {label}",
        per_call,
        "acall",
        "pynenc",
        metric="rate",
        target=target,
    )


def _lazy(settings: Settings, acall: _Acall) -> Iterator[Figure]:
    """LazyCall.arguments() of 8 offloaded 1 MB arguments vs 1, from Redis, uncached."""
    if RedisServer.find_executable() is None:
        print("calls: redis-server not found; lazy-load figure skipped", file=sys.stderr)
        return
    with RedisServer() as server:
        store = open_store(server.url_for(0))
        try:
            yield from _lazy_on(settings, acall, store)
        finally:
            acall.run(store.close())
        yield _lazy_floor(settings, server.url_for(0))


def _lazy_floor(settings: Settings, url: str) -> Figure:
    """The least any client must do for the same loads: MGET the serialized texts
    (unframed, unhashed) and ``json.loads`` each, 8 vs 1 — the floor under the ratio."""
    import json

    import redis

    texts = {
        f"floor:a{k}": _SERIALIZER.dumps(text_of_size(1_000_000, tag=f"a{k}:")) for k in range(8)
    }
    with redis.Redis.from_url(url) as client:
        client.mset(texts)
        keys = list(texts)

        def load(names: list[str]) -> list[Any]:
            return [json.loads(raw) for raw in client.mget(names)]

        if load(keys) != [json.loads(t) for t in texts.values()]:
            raise BenchError("lazy floor: values read back differ")
        timings = measure(
            [Contender("8 args", load, keys), Contender("1 arg", load, keys[:1])], settings
        )
    return compare(
        GROUP,
        "lazy load floor: bare MGET + json.loads, 8 vs 1 x 1 MB",
        timings,
        "8 args",
        "1 arg",
        metric="time",
    )


def _lazy_on(settings: Settings, acall: _Acall, store: Store) -> Iterator[Figure]:
    eight = {f"a{k}": text_of_size(1_000_000, tag=f"a{k}:") for k in range(8)}
    one = {"payload": eight["a0"]}
    upload = OffloadCodec(store, _SERIALIZER)
    spec8, spec1 = acall.spec(eight_task), acall.spec(big_task)
    dto8: CallDTO = acall.run(acall.call(spec8, upload, eight))
    dto1: CallDTO = acall.run(acall.call(spec1, upload, one))
    if not all(v.startswith(REFERENCE_PREFIX) for v in dto8.serialized_arguments.values()):
        raise BenchError("lazy load: the 1 MB arguments were not offloaded")

    async def load(spec: TaskSpec, dto: CallDTO) -> dict[str, Any]:
        codec = OffloadCodec(store, _SERIALIZER)  # fresh: no cached text
        lazy: LazyCall[Any] = LazyCall.from_dto(spec, codec, dto)
        return await lazy.arguments()

    if acall.run(load(spec8, dto8)) != eight or acall.run(load(spec1, dto1)) != one:
        raise BenchError("lazy load: loaded arguments differ from the submitted ones")
    timings = measure(
        [
            Contender("8 args", lambda d: acall.runner.run(load(spec8, d)), dto8),
            Contender("1 arg", lambda d: acall.runner.run(load(spec1, d)), dto1),
        ],
        settings,
    )
    yield compare(
        GROUP,
        "lazy load 8 vs 1 x 1 MB (Redis)",
        timings,
        "8 args",
        "1 arg",
        metric="time",
        target=Target("<=", 1.5, "time to load 8 offloaded 1 MB args <= 1.5x the time for 1"),
    )


def _stalls(settings: Settings, acall: _Acall, pynenc: _Pynenc) -> Iterator[Figure]:
    """Longest event-loop stall while one 100 MB argument is serialized and offloaded."""
    rounds = 1 if settings.quick else 3
    records = make_records(10_000_000)
    values: dict[str, Any] = {
        "str": text_of_size(100_000_000),
        "dicts": records * 10,  # the same ~10 MB of dicts ten times: ~100 MB of JSON
    }
    spec = acall.spec(big_task)
    # Young objects are walked by every collection until they are promoted, and old
    # ones by every full collection: freeze the fixtures so the rounds time the
    # contenders' own work (see the module docstring).
    gc.collect()
    gc.freeze()
    try:
        yield from _stall_figures(rounds, values, spec, acall, pynenc)
    finally:
        gc.unfreeze()


def _stall_figures(
    rounds: int, values: Mapping[str, Any], spec: TaskSpec, acall: _Acall, pynenc: _Pynenc
) -> Iterator[Figure]:
    for label, value in values.items():
        kwargs = {"payload": value}
        nbytes = serialized_bytes(value)

        async def acall_stall(kw: Mapping[str, Any] = kwargs) -> float:
            codec = OffloadCodec(MemoryStore(), _SERIALIZER)
            async with Heartbeat(HEARTBEAT_S) as hb:
                await _Acall.call(spec, codec, kw)
            return hb.max_gap

        async def pynenc_stall(kw: Mapping[str, Any] = kwargs) -> float:
            async with Heartbeat(HEARTBEAT_S) as hb:
                pynenc.cold_call(big_task, kw)  # synchronous: the loop waits for all of it
            return hb.max_gap

        stalls: dict[str, list[float]] = {"acall": [], "pynenc": []}
        for r in range(rounds):
            order = [("acall", acall_stall), ("pynenc", pynenc_stall)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                stalls[name].append(acall.runner.run(fn()))
        worst = {name: max(gaps) * 1000 for name, gaps in stalls.items()}
        details: dict[str, Any] = {
            name: {"max_gap_ms": [g * 1000 for g in gaps]} for name, gaps in stalls.items()
        }
        details["serialized_bytes"] = nbytes
        name = f"loop stall, {nbytes / 1e6:.0f} MB {label}"
        yield versus_limit(
            GROUP,
            name,
            "acall",
            worst["acall"],
            "ms",
            limit=STALL_LIMIT_MS,
            op="<=",
            limit_name="limit",
            description=(
                f"longest event-loop stall while serializing and offloading one 100 MB "
                f"{label} argument <= {STALL_LIMIT_MS:g} ms (worst of {rounds} rounds)"
            ),
            details=details,
        )
        yield _info(name, "pynenc", worst["pynenc"], "ms", details)


def _info(name: str, subject: str, value: float, unit: str, details: Mapping[str, Any]) -> Figure:
    return Figure(GROUP, name, subject, value, unit, details=dict(details))
