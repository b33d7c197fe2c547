"""Call, LazyCall and PreSerializedCall: binding, concurrency, identity, errors."""

from __future__ import annotations

import datetime
import inspect
import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from helpers import CountingSerializer, CountingStore
from hypothesis import given
from hypothesis import strategies as st

from acall import (
    CallSerializationError,
    DeserializationError,
    InvalidArgumentsError,
    NotSerializedError,
    SerializationError,
    TaskId,
    compute_args_id,
)
from acall.calls import Call, ConcurrencyMode, LazyCall, PreSerializedCall, TaskSpec
from acall.codec import OffloadCodec
from acall.dto import make_call_dto
from acall.hashing import REFERENCE_PREFIX


def simple(a: Any, b: Any, c: Any = 3) -> None: ...


def varied(a: Any, /, b: Any, *rest: Any, k: Any = 1, **extra: Any) -> None: ...


def test_invoke_passes_loaded_arguments_by_name_and_ignores_unknown_names() -> None:
    seen: list[tuple[Any, ...]] = []

    def plain(a: Any, b: Any, c: Any = 3) -> None:
        seen.append((a, b, c))

    def mixed(a: Any, /, b: Any, *rest: Any, k: Any = 1, **extra: Any) -> None:
        seen.append((a, b, rest, k, extra))

    TaskSpec(plain).invoke({"a": 1, "b": 2, "c": 3})
    TaskSpec(plain).invoke({"c": 30, "b": 20, "a": 10, "stale": 0})  # an extra name: ignored
    TaskSpec(mixed).invoke({"a": 1, "b": 2, "rest": (3, 4), "k": 5, "extra": {"x": 6}})
    assert seen == [(1, 2, 3), (10, 20, 30), (1, 2, (3, 4), 5, {"x": 6})]
    with pytest.raises(TypeError, match="'b'"):
        TaskSpec(plain).invoke({"a": 1, "c": 3})


def keyed(user_id: Any, region: Any, frame: Any = None) -> None: ...


def defaulted(frame: Any, user_id: Any, region: Any = "eu") -> None: ...


def open_kw(a: Any, b: Any, **extra: Any) -> None: ...


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def codec(store: CountingStore) -> OffloadCodec:
    return OffloadCodec(store, serializer=CountingSerializer())


def _pynenc_bind(func: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@pytest.mark.parametrize(
    ("func", "args", "kwargs"),
    [
        (simple, (1, 2), {}),
        (simple, (1,), {"b": 2}),
        (simple, (), {"c": 9, "a": 1, "b": 2}),
        (simple, (1, 2, 4), {}),
        (varied, (1, 2, 3, 4), {"k": 5, "z": 6}),
        (varied, (1,), {"b": 2}),
    ],
)
def test_binding_matches_signature_bind(func: Any, args: Any, kwargs: Any) -> None:
    spec = TaskSpec(func)
    assert spec.bind(args, kwargs) == _pynenc_bind(func, *args, **kwargs)


@given(
    args=st.lists(st.integers(), max_size=4),
    kwargs=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(), max_size=4),
)
def test_fast_binding_agrees_with_inspect_or_both_fail(
    args: list[int], kwargs: dict[str, int]
) -> None:
    spec = TaskSpec(simple)
    try:
        expected = _pynenc_bind(simple, *args, **kwargs)
    except TypeError:
        with pytest.raises(InvalidArgumentsError, match=r"__main__|test_calls"):
            spec.bind(args, kwargs)
        return
    assert spec.bind(args, kwargs) == expected
    assert list(spec.bind(args, kwargs)) == list(expected)


def test_binding_errors_name_the_task() -> None:
    spec = TaskSpec(simple)
    for args, kwargs, needle in [
        ((1,), {}, "missing required arguments \\['b'\\]"),
        ((1, 2, 3, 4), {}, "positional arguments"),
        ((1, 2), {"zz": 1}, "unexpected keyword arguments \\['zz'\\]"),
        ((1, 2), {"a": 1}, "multiple values for argument 'a'"),
    ]:
        with pytest.raises(InvalidArgumentsError, match=needle) as info:
            spec.bind(args, kwargs)
        assert "test_calls.simple" in str(info.value)


def test_key_arguments_must_be_parameters() -> None:
    with pytest.raises(InvalidArgumentsError, match="nope"):
        TaskSpec(keyed, key_arguments=["nope"])


async def test_identity_requires_serialization(codec: OffloadCodec) -> None:
    call: Call[Any] = Call.from_args(TaskSpec(simple), codec, 1, 2)
    assert not call.is_serialized
    with pytest.raises(NotSerializedError, match=r"await call\.serialize"):
        _ = call.args_id
    await call.serialize()
    assert call.args_id == compute_args_id({"a": "1", "b": "2", "c": "3"})
    assert call.to_dto().serialized_arguments == {"a": "1", "b": "2", "c": "3"}
    assert call.call_id.key == f"test_calls.simple:{call.args_id}"


async def test_equality_and_hash_by_call_id(codec: OffloadCodec) -> None:
    spec = TaskSpec(simple)
    a: Call[Any] = Call.from_args(spec, codec, 1, 2)
    b: Call[Any] = Call.from_args(spec, codec, a=1, b=2, c=3)
    c: Call[Any] = Call.from_args(spec, codec, 1, 3)
    for call in (a, b, c):
        await call.serialize()
    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, codec, a.to_dto())
    assert lazy == a
    assert len({a, b, c, lazy}) == 2


async def test_concurrent_awaits_share_one_serialization(
    store: CountingStore, codec: OffloadCodec
) -> None:
    serializer = codec.serializer
    assert isinstance(serializer, CountingSerializer)
    big = ["row" * 10] * 40_000  # large: encoded in a thread, offloaded
    call: Call[Any] = Call.from_args(TaskSpec(simple), codec, big, "x" * 3000)
    results = []

    async def serialize() -> None:
        results.append(dict(await call.serialize()))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(serialize)
    assert all(r == results[0] for r in results)
    assert store.calls["put"] == 2
    # a, b and c each encoded once: eight awaits shared one serialization.
    assert serializer.dumped == 3
    assert results[0]["a"].startswith(REFERENCE_PREFIX)


async def test_every_failing_argument_is_reported(codec: OffloadCodec) -> None:
    class Weird:
        pass

    call: Call[Any] = Call.from_args(TaskSpec(simple), codec, {1, 2}, "fine", Weird())
    with pytest.raises(CallSerializationError) as info:
        await call.serialize()
    err = info.value
    assert [name for name, _ in err.failures] == ["a", "c"]
    text = str(err)
    assert "test_calls.simple" in text
    assert "'a'" in text
    assert "set" in text
    assert "Weird" in text
    assert isinstance(err, SerializationError)


async def test_concurrency_control_modes(codec: OffloadCodec) -> None:
    spec = TaskSpec(keyed, key_arguments=["user_id", "region"])
    call: Call[Any] = Call.from_args(spec, codec, 7, "eu", frame=object())
    assert await call.serialized_args_for_concurrency_control(ConcurrencyMode.DISABLED) is None
    assert await call.serialized_args_for_concurrency_control(ConcurrencyMode.TASK) is None
    # KEYS encodes only the key arguments: the unserializable frame is never touched.
    keys = await call.serialized_args_for_concurrency_control(ConcurrencyMode.KEYS)
    assert keys == {"user_id": "7", "region": '"eu"'}
    with pytest.raises(CallSerializationError):
        await call.serialized_args_for_concurrency_control(ConcurrencyMode.ARGUMENTS)


async def test_keys_results_are_reused_by_full_serialization(codec: OffloadCodec) -> None:
    serializer = codec.serializer
    assert isinstance(serializer, CountingSerializer)
    spec = TaskSpec(keyed, key_arguments=["user_id"])
    call: Call[Any] = Call.from_args(spec, codec, 7, "eu")
    await call.serialized_args_for_concurrency_control(ConcurrencyMode.KEYS)
    assert serializer.dumped == 1
    full = await call.serialized_args_for_concurrency_control(ConcurrencyMode.ARGUMENTS)
    assert full == {"user_id": "7", "region": '"eu"', "frame": "null"}
    assert serializer.dumped == 3


async def test_lazy_call_identity_costs_no_io_and_no_decoding(
    store: CountingStore, codec: OffloadCodec
) -> None:
    spec = TaskSpec(keyed)
    call: Call[Any] = Call.from_args(spec, codec, 1, "eu", frame="f" * 10_000)
    dto = (await call.serialize(), call.to_dto())[1]
    serializer = codec.serializer
    assert isinstance(serializer, CountingSerializer)
    store.reset()
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, codec, dto)
    assert lazy.call_id == call.call_id
    assert lazy.args_id == call.args_id
    assert lazy.arg_keys == {"user_id", "region", "frame"}
    assert lazy == call
    assert lazy.to_dto() == dto
    assert sum(store.calls.values()) == 0
    assert serializer.loaded == 0


async def test_lazy_single_argument_fetches_only_its_blob(store: CountingStore) -> None:
    codec = OffloadCodec(store)
    spec = TaskSpec(keyed)
    call: Call[Any] = Call.from_args(spec, codec, "u" * 2000, "eu", frame="f" * 50_000)
    await call.serialize()
    reader = OffloadCodec(store)
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, reader, call.to_dto())
    store.reset()
    assert await lazy.argument("region") == "eu"
    assert sum(store.calls.values()) == 0
    assert await lazy.argument("user_id") == "u" * 2000
    assert store.keys_fetched == [call.serialized_arguments["user_id"]]
    with pytest.raises(KeyError):
        await lazy.argument("nope")


async def test_lazy_arguments_use_one_batched_fetch(store: CountingStore) -> None:
    def eight(a: Any, b: Any, c: Any, d: Any, e: Any, f: Any, g: Any, h: Any) -> None: ...

    codec = OffloadCodec(store)
    spec = TaskSpec(eight)
    call: Call[Any] = Call.from_args(spec, codec, *[str(i) * 5000 for i in range(8)])
    await call.serialize()
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, OffloadCodec(store), call.to_dto())
    store.reset()
    values = await lazy.arguments()
    assert store.calls["get_many"] == 1
    assert store.calls["get"] == 0
    assert values == dict(zip("abcdefgh", [str(i) * 5000 for i in range(8)], strict=True))
    again = await lazy.arguments()
    assert again == values
    assert store.calls["get_many"] == 1  # cached on the LazyCall


async def test_lazy_arguments_now_only_where_no_io_is_needed(store: CountingStore) -> None:
    codec = OffloadCodec(store)
    spec = TaskSpec(simple)
    small: Call[Any] = Call.from_args(spec, codec, 1, "two", c=[3])
    await small.serialize()
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, OffloadCodec(store), small.to_dto())
    store.reset()
    loaded = lazy.arguments_now()
    assert loaded == {"a": 1, "b": "two", "c": [3]}
    assert sum(store.calls.values()) == 0
    loaded["a"] = "changed"  # a copy: the cache keeps what was loaded
    assert await lazy.arguments() == {"a": 1, "b": "two", "c": [3]}

    offloaded: Call[Any] = Call.from_args(spec, codec, 1, "x" * 5000)
    await offloaded.serialize()
    lazy = LazyCall.from_dto(spec, OffloadCodec(store), offloaded.to_dto())
    store.reset()
    assert lazy.arguments_now() is None  # a reference: arguments() fetches it
    assert sum(store.calls.values()) == 0
    assert await lazy.arguments() == {"a": 1, "b": "x" * 5000, "c": 3}

    def typed(when: datetime.date) -> None: ...

    typed_spec = TaskSpec(typed)
    dated: Call[Any] = Call.from_args(typed_spec, codec, datetime.date(2026, 11, 29))
    await dated.serialize()
    lazy = LazyCall.from_dto(typed_spec, codec, dated.to_dto())
    assert lazy.arguments_now() is None  # typed: structured by arguments()
    assert await lazy.arguments() == {"when": datetime.date(2026, 11, 29)}


async def test_lazy_arguments_now_leaves_bad_text_to_arguments(codec: OffloadCodec) -> None:
    spec = TaskSpec(simple)
    call: Call[Any] = Call.from_args(spec, codec, 1, 2)
    await call.serialize()
    dto = make_call_dto(call.call_id, {**call.serialized_arguments, "b": "{not json"})
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, codec, dto)
    assert lazy.arguments_now() is None
    with pytest.raises(DeserializationError, match="'b'"):
        await lazy.arguments()


async def test_lazy_large_blobs_are_parsed_once_each_into_objects_of_their_own(
    store: CountingStore,
) -> None:
    # Blobs above the thread threshold are checked and parsed by one worker thread each;
    # two arguments with equal values share one blob but must not share one object.
    def four(a: Any, b: Any, c: Any, d: Any) -> None: ...

    big = list(range(60_000))  # about 400 KB of JSON: parsed in a thread
    other = {"rows": [str(i) for i in range(40_000)]}
    spec = TaskSpec(four)
    call: Call[Any] = Call.from_args(spec, OffloadCodec(store), big, list(big), other, 7)
    await call.serialize()
    refs = call.serialized_arguments
    assert refs["a"] == refs["b"] != refs["c"]
    assert refs["a"].startswith(REFERENCE_PREFIX)
    reader = OffloadCodec(store, serializer=CountingSerializer())
    values = await LazyCall.from_dto(spec, reader, call.to_dto()).arguments()
    assert values == {"a": big, "b": big, "c": other, "d": 7}
    assert values["a"] is not values["b"]
    values["a"].append(-1)
    assert values["b"] == big
    assert store.calls["get_many"] == 1
    serializer = reader.serializer
    assert isinstance(serializer, CountingSerializer)
    assert serializer.loaded == 4  # a, b (from the same text), c and d: once each


async def test_lazy_large_blob_that_fails_to_parse_names_argument_and_call(
    store: CountingStore,
) -> None:
    from acall import DeserializationError

    spec = TaskSpec(keyed)
    call: Call[Any] = Call.from_args(spec, OffloadCodec(store), 1, "eu", frame="f" * 300_000)
    await call.serialize()
    # A reader whose serializer refuses what it reads: the failure happens in the thread
    # that checked the blob, and must still name the argument and the call.

    class Refusing(CountingSerializer):
        def loads(self, text: str) -> Any:
            if len(text) > 1000:
                raise DeserializationError("refused for the test")
            return super().loads(text)

    lazy: LazyCall[Any] = LazyCall.from_dto(
        spec, OffloadCodec(store, serializer=Refusing()), call.to_dto()
    )
    with pytest.raises(DeserializationError) as info:
        await lazy.arguments()
    assert "'frame'" in str(info.value)
    assert call.call_id.key in str(info.value)
    assert "refused for the test" in str(info.value)


async def test_lazy_missing_blob_names_argument_and_call(store: CountingStore) -> None:
    from acall import BlobNotFoundError

    codec = OffloadCodec(store)
    spec = TaskSpec(keyed)
    call: Call[Any] = Call.from_args(spec, codec, 1, "eu", frame="f" * 5000)
    await call.serialize()
    await store.delete(call.serialized_arguments["frame"])
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, OffloadCodec(store), call.to_dto())
    with pytest.raises(BlobNotFoundError) as info:
        await lazy.arguments()
    assert "'frame'" in str(info.value)
    assert call.call_id.key in str(info.value)
    assert await lazy.argument("user_id") == 1  # the healthy arguments still load


async def test_preserialized_batch_shares_common_arguments(store: CountingStore) -> None:
    codec = OffloadCodec(store, serializer=CountingSerializer())
    spec = TaskSpec(keyed)
    frame = {"pixels": list(range(20_000))}
    calls: list[PreSerializedCall[Any]] = await PreSerializedCall.batch(
        spec, codec, {"frame": frame}, [{"user_id": i, "region": "eu"} for i in range(50)]
    )
    puts_after_common = store.calls["put"]
    for call in calls:
        await call.serialize()
    assert puts_after_common == 1
    assert store.calls["put"] == 1
    refs = {c.serialized_arguments["frame"] for c in calls}
    assert len(refs) == 1
    # Identity is exactly that of an ordinary call with the same arguments.
    plain: Call[Any] = Call.from_args(spec, OffloadCodec(CountingStore()), 3, "eu", frame=frame)
    await plain.serialize()
    assert calls[3].call_id == plain.call_id
    assert calls[3].arg_keys == {"user_id", "region", "frame"}


async def test_preserialized_batch_in_chunks(codec: OffloadCodec) -> None:
    """batch_chunks gives batch()'s calls in lists of at most *size*, each made when it
    is taken, after every mapping was checked."""
    spec = TaskSpec(keyed)
    per_call: list[dict[str, Any]] = [{"user_id": i, "region": "eu"} for i in range(7)]
    chunks: Iterator[list[PreSerializedCall[Any]]] = await PreSerializedCall.batch_chunks(
        spec, codec, {"frame": 1}, per_call, size=3
    )
    first = next(chunks)
    assert len(first) == 3
    rest = list(chunks)
    assert [len(c) for c in rest] == [3, 1]
    whole: list[PreSerializedCall[Any]] = await PreSerializedCall.batch(
        spec, codec, {"frame": 1}, per_call
    )
    for chunked, made in zip([*first, *rest[0], *rest[1]], whole, strict=True):
        await chunked.serialize()
        await made.serialize()
        assert chunked.call_id == made.call_id
    # A bad mapping anywhere raises before any list is made.
    bad = [*per_call, {"user_id": 1, "nope": 2}]
    with pytest.raises(InvalidArgumentsError):
        await PreSerializedCall.batch_chunks(spec, codec, {"frame": 1}, bad, size=3)


async def test_preserialized_batch_rejects_clashing_arguments(codec: OffloadCodec) -> None:
    with pytest.raises(InvalidArgumentsError, match="both as common and per-call"):
        await PreSerializedCall.batch(
            TaskSpec(keyed), codec, {"region": "eu"}, [{"region": "us", "user_id": 1}]
        )


async def test_preserialized_batch_binds_each_call_like_a_plain_call(codec: OffloadCodec) -> None:
    # Calls of one batch with different sets of names, in different orders, with and
    # without defaults: each must serialize exactly as the plain call with its arguments.
    per_call: list[dict[str, Any]] = [
        {"user_id": 1, "region": "eu"},
        {"user_id": 2},
        {"region": "us", "user_id": 3},
        {"user_id": 4, "region": "eu"},
        {"user_id": [5, 6]},
    ]
    spec = TaskSpec(defaulted)
    calls: list[PreSerializedCall[Any]] = await PreSerializedCall.batch(
        spec, codec, {"frame": "f" * 5000}, per_call
    )
    for own, call in zip(per_call, calls, strict=True):
        plain: Call[Any] = Call.from_args(spec, codec, frame="f" * 5000, **own)
        await call.serialize()
        await plain.serialize()
        assert list(call.serialized_arguments) == ["frame", "user_id", "region"]
        assert dict(call.serialized_arguments) == dict(plain.serialized_arguments)
        assert call.call_id == plain.call_id
    # Each call owns its arguments: they are not one shared template dict.
    assert calls[0].arguments == {"user_id": 1, "region": "eu"}
    assert calls[3].arguments == {"user_id": 4, "region": "eu"}
    assert calls[0].arguments is not calls[3].arguments


async def test_preserialized_batch_with_varargs_binds_per_call(codec: OffloadCodec) -> None:
    spec = TaskSpec(open_kw)
    calls: list[PreSerializedCall[Any]] = await PreSerializedCall.batch(
        spec, codec, {"a": 0}, [{"b": 1, "z": 2}, {"b": 3, "z": 4}]
    )
    for i, call in enumerate(calls):
        await call.serialize()
        assert call.serialized_arguments["extra"] == json.dumps({"z": 2 * i + 2})
        plain: Call[Any] = Call.from_args(spec, codec, 0, b=2 * i + 1, z=2 * i + 2)
        await plain.serialize()
        assert call.call_id == plain.call_id


async def test_preserialized_call_refuses_overlapping_arguments(codec: OffloadCodec) -> None:
    with pytest.raises(InvalidArgumentsError, match=r"\['region'\] are given both"):
        PreSerializedCall(TaskSpec(keyed), codec, {"region": '"eu"'}, {"region": "us"})


async def test_serialized_arguments_keep_argument_order_after_keys(codec: OffloadCodec) -> None:
    # KEYS encodes the key argument first; the full serialization still lists the
    # arguments in signature order (the wire order), not in the order they were encoded.
    spec = TaskSpec(keyed, key_arguments=["region"])
    call: Call[Any] = Call.from_args(spec, codec, 7, "eu", "frame")
    await call.serialized_args_for_concurrency_control(ConcurrencyMode.KEYS)
    serialized = await call.serialize()
    assert list(serialized) == ["user_id", "region", "frame"]
    assert call.to_dto().serialized_arguments == dict(serialized)


async def test_task_known_only_by_id(codec: OffloadCodec) -> None:
    spec = TaskSpec(None, task_id=TaskId("remote.module", "job"))
    call: Call[Any] = Call.from_args(spec, codec, x=1)
    await call.serialize()
    assert call.call_id.key.startswith("remote.module.job:")
    with pytest.raises(InvalidArgumentsError, match="by keyword"):
        Call.from_args(spec, codec, 1)


async def test_no_arguments_is_no_args(codec: OffloadCodec) -> None:
    def nothing() -> None: ...

    call: Call[Any] = Call.from_args(TaskSpec(nothing), codec)
    await call.serialize()
    assert call.args_id == "no_args"
    assert json.loads(json.dumps(call.to_dto().serialized_arguments)) == {}
