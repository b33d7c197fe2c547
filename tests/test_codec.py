"""Offload codec: routing, references, framing, chunking, compression, cache, safety."""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import xxhash
from fuzz_support import fuzz_settings
from helpers import CountingStore
from hypothesis import given
from hypothesis import strategies as st

from acall import (
    BlobCorruptedError,
    BlobNotFoundError,
    ConfigurationError,
    InvalidKeyError,
    SerializationError,
    _digest,
)
from acall.codec import (
    THREAD_MIN_CHARS,
    OffloadCodec,
    OffloadSettings,
    _split_chunks,
    estimate_chars,
)
from acall.hashing import REFERENCE_PREFIX, content_reference
from acall.serializers import JsonSerializer
from acall.stores import MemoryStore, Store, open_store

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "pynenc-args-id.json").read_text(encoding="utf-8")
)["end_to_end_json"]


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/blobs.db"
    async with open_store(url) as s:
        yield s


async def test_small_values_stay_inline(store: Store) -> None:
    codec = OffloadCodec(store)
    assert await codec.encode({"a": [1, 2]}) == '{"a": [1, 2]}'
    assert [k async for k in store.scan()] == []


async def test_encode_now_takes_only_scalars_that_stay_inline(store: Store) -> None:
    codec = OffloadCodec(store, settings=OffloadSettings(min_size_to_offload=5))
    for value, text in [(7, "7"), (-1.5, "-1.5"), (True, "true"), (None, "null")]:
        assert codec.encode_now(value) == text
        assert await codec.encode(value) == text
    assert codec.encode_now("7") is None  # not a scalar: sized and routed by encode()
    assert codec.encode_now([7]) is None
    for long in (False, 10**200):  # texts past the offload threshold
        assert codec.encode_now(long) is None
        assert (await codec.encode(long)).startswith(REFERENCE_PREFIX)
    assert codec.stats["inline_chars"] == 2 * len("7-1.5truenull")


@pytest.mark.parametrize("length", [1021, 1022, 1023, 1024, 1025])
async def test_offload_threshold_in_characters(store: Store, length: int) -> None:
    codec = OffloadCodec(store)
    value = "a" * (length - 2)  # JSON adds two quotes
    text = json.dumps(value)
    assert len(text) == length
    out = await codec.encode(value)
    if length >= 1024:
        assert out == content_reference(text)
        assert await store.exists(out)
    else:
        assert out == text


@pytest.mark.parametrize(("count", "offloaded"), [(300, False), (400, True)])
async def test_values_sent_to_a_thread_by_their_estimate_follow_the_rule(
    store: Store, count: int, offloaded: bool
) -> None:
    """Too many items to inspect quickly: encoded (and hashed) in a thread, yet the
    offload rule is still the exact length of the text."""
    codec = OffloadCodec(store)
    value = [0] * count
    assert estimate_chars(value, THREAD_MIN_CHARS) >= THREAD_MIN_CHARS
    text = json.dumps(value)
    assert (len(text) >= 1024) is offloaded
    out = await codec.encode(value)
    assert out == (content_reference(text) if offloaded else text)
    assert await codec.decode(out) == value
    assert [k async for k in store.scan()] == ([out] if offloaded else [])


async def test_max_size_keeps_inline_with_warning(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    codec = OffloadCodec(store, settings=OffloadSettings(max_size_to_offload=2000))
    assert (await codec.encode("x" * 1500)).startswith(REFERENCE_PREFIX)
    assert await codec.encode("x" * 3000) == json.dumps("x" * 3000)
    assert "max_size_to_offload" in caplog.text


async def test_max_size_applies_to_values_encoded_in_pieces(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # Encoded in a thread, many pieces long, digested as the pieces come: the limit is
    # still the exact length of the whole text, on either side of it.
    value = list(range(600_000))
    text = json.dumps(value)
    at_limit = OffloadCodec(store, settings=OffloadSettings(max_size_to_offload=len(text)))
    assert await at_limit.encode(value) == content_reference(text)
    below = OffloadCodec(store, settings=OffloadSettings(max_size_to_offload=len(text) - 1))
    assert await below.encode(value) == text
    assert "max_size_to_offload" in caplog.text


async def test_disable_offload_by_name_and_star(store: Store) -> None:
    codec = OffloadCodec(store, settings=OffloadSettings(disable_offload={"frame"}))
    big = "y" * 5000
    assert await codec.encode(big, name="frame") == json.dumps(big)
    assert (await codec.encode(big, name="other")).startswith(REFERENCE_PREFIX)
    codec = OffloadCodec(store, settings=OffloadSettings(disable_offload={"*"}))
    assert await codec.encode(big, name="other") == json.dumps(big)


async def test_end_to_end_vectors_in_full(store: Store) -> None:
    """pynenc's own kwargs -> serialized_arguments -> args_id -> call key, offloads included."""
    from acall.calls import Call, TaskSpec
    from acall.ids import TaskId

    codec = OffloadCodec(store)
    spec = TaskSpec(None, task_id=TaskId(VECTORS["task_module"], VECTORS["task_name"]))
    offloaded = 0
    for case in VECTORS["cases"]:
        call: Call[Any] = Call.from_args(spec, codec, **case["kwargs"])
        assert dict(await call.serialize()) == case["serialized_arguments"]
        assert call.args_id == case["args_id"]
        assert call.call_id.key == case["call_key"]
        for name, value in case["serialized_arguments"].items():
            if value.startswith(REFERENCE_PREFIX):
                offloaded += 1
                assert await codec.decode(value) == case["kwargs"][name]
    assert offloaded > 0


@given(st.lists(st.binary(max_size=300), max_size=40), st.integers(1, 700))
@fuzz_settings(0.2)
def test_chunks_are_exact_bytes_cut_at_exact_sizes(pieces: list[bytes], chunk_size: int) -> None:
    chunks = list(_split_chunks(pieces, chunk_size))
    assert b"".join(chunks) == b"".join(pieces)
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert all(0 < len(c) <= chunk_size for c in chunks)
    assert all(type(c) is bytes for c in chunks)


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("size", [2000, 300_000, 3_000_000])
async def test_round_trip_compression_and_chunks(store: Store, compression: Any, size: int) -> None:
    settings = OffloadSettings(compression=compression, chunk_size=64 * 1024)
    writer = OffloadCodec(store, settings=settings)
    value = [{"i": i, "s": "ü" * (i % 7)} for i in range(size // 20)]
    ref = await writer.encode(value)
    assert ref.startswith(REFERENCE_PREFIX)
    # A reader with default settings needs no configuration to decode.
    reader = OffloadCodec(store)
    assert await reader.decode(ref) == value
    chunks = [k async for k in store.scan(ref + ":")]
    blob = await store.get(ref)
    assert blob is not None
    if chunks:
        assert len(blob) == 24 + 12  # header + manifest only
        sizes = [len(b or b"") for b in await store.get_many(chunks)]
        assert max(sizes) <= 64 * 1024


async def test_identical_values_upload_once() -> None:
    store = CountingStore()
    codec = OffloadCodec(store)
    refs = [await codec.encode("z" * 4000) for _ in range(3)]
    assert len(set(refs)) == 1
    assert store.calls["put"] == 1
    assert codec.stats["uploads_skipped"] == 2


async def test_concurrent_fetches_share_one_round_trip() -> None:
    store = CountingStore()
    ref = await OffloadCodec(store).encode(list(range(5000)))
    codec = OffloadCodec(store, settings=OffloadSettings(local_cache_size=0))
    results: list[Any] = []

    async def load() -> None:
        results.append(await codec.decode(ref))

    store.reset()
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(load)
    assert store.calls["get_many"] == 1
    assert len(results) == 10
    # Every caller got its own object: mutating one changes no other.
    results[0].append("mutated")
    assert all(len(r) == 5000 for r in results[1:])


async def test_local_cache_returns_fresh_objects() -> None:
    store = CountingStore()
    codec = OffloadCodec(store)
    ref = await codec.encode({"rows": list(range(1000))})
    store.reset()
    first = await codec.decode(ref)
    second = await codec.decode(ref)
    assert store.calls["get_many"] == 1
    assert first == second
    assert first is not second
    first["rows"].clear()
    assert len(second["rows"]) == 1000


async def test_several_references_in_one_batch() -> None:
    store = CountingStore()
    codec = OffloadCodec(store, settings=OffloadSettings(local_cache_size=0))
    refs = [await codec.encode(f"{i}" * 3000) for i in range(8)]
    store.reset()
    texts = await codec.fetch_texts(refs)
    assert store.calls["get_many"] == 1
    assert store.calls["get"] == 0
    assert [json.loads(texts[r]) for r in refs] == [f"{i}" * 3000 for i in range(8)]


@pytest.mark.parametrize(
    "bad",
    [
        REFERENCE_PREFIX + "../../etc/passwd",
        REFERENCE_PREFIX + "A" * 64,
        REFERENCE_PREFIX + "0" * 64 + "' OR 1=1",
        "__pynenc__client_data__:" + "0" * 65,
    ],
)
async def test_bad_references_never_reach_the_store(bad: str) -> None:
    store = CountingStore()
    codec = OffloadCodec(store)
    with pytest.raises(InvalidKeyError):
        await codec.decode(bad)
    assert sum(store.calls.values()) == 0


async def test_missing_blob_names_the_reference(store: Store) -> None:
    codec = OffloadCodec(store)
    ref = content_reference('"never stored"')
    with pytest.raises(BlobNotFoundError) as info:
        await codec.decode(ref)
    assert info.value.reference == ref
    assert ref in str(info.value)


async def _stored(store: Store, value: Any, **settings: Any) -> tuple[OffloadCodec, str]:
    codec = OffloadCodec(store, settings=OffloadSettings(local_cache_size=0, **settings))
    return codec, await codec.encode(value)


@pytest.mark.parametrize(
    ("mangle", "needle"),
    [
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
        (lambda b: b"XXXX" + b[4:], "no acall frame"),
        (lambda b: b[:4] + b"\x09" + b[5:], "unknown compression"),
        (lambda b: b + b"extra", "more than its declared"),
        (lambda b: b"", "truncated"),
    ],
)
async def test_corrupted_blobs_fail_loudly(store: Store, mangle: Any, needle: str) -> None:
    codec, ref = await _stored(store, "q" * 5000)
    blob = await store.get(ref)
    assert blob is not None
    await store.put(ref, mangle(blob))
    with pytest.raises(BlobCorruptedError, match=needle) as info:
        await codec.decode(ref)
    assert info.value.reference == ref


async def test_blob_under_the_wrong_key_is_detected(store: Store) -> None:
    codec, ref_a = await _stored(store, "a" * 5000)
    ref_b = await codec.encode("b" * 5000)
    await store.put(ref_b, await store.get(ref_a) or b"")
    with pytest.raises(BlobCorruptedError, match="wrong key"):
        await codec.decode(ref_b)


async def test_missing_or_truncated_chunk(store: Store) -> None:
    codec, ref = await _stored(store, "c" * 50_000, chunk_size=4096)
    keys = sorted([k async for k in store.scan(ref + ":")], key=lambda k: int(k.rsplit(":")[-1]))
    assert len(keys) > 5
    await store.put(keys[2], (await store.get(keys[2]) or b"")[:-3])
    with pytest.raises(BlobCorruptedError, match=r"expected|truncated"):
        await codec.decode(ref)
    await store.delete(keys[3])
    with pytest.raises(BlobCorruptedError, match="missing its chunk 3"):
        await codec.decode(ref)


@pytest.mark.parametrize("compression", [1, 2])
async def test_decompression_bomb_is_refused(store: Store, compression: int) -> None:
    """A frame declaring 1 KB whose payload inflates to 200 MB stops at 1 KB + 1."""
    payload = b"0" * (200 * 1024 * 1024)
    if compression == 1:
        stored = zlib.compress(payload, 9)
    else:
        import zstandard

        stored = zstandard.ZstdCompressor(level=19).compress(payload)
    ref = content_reference('"bomb"')
    header = struct.pack(
        "<4sBBHQQ", b"ACB\x01", compression, 0, 0, 1024, xxhash.xxh3_64_intdigest(b"x")
    )
    await store.put(ref, header + stored)
    codec = OffloadCodec(store)
    with pytest.raises(BlobCorruptedError, match="more than its declared"):
        await codec.decode(ref)


async def test_absurd_declared_size_is_refused(store: Store) -> None:
    ref = content_reference('"huge"')
    header = struct.pack("<4sBBHQQ", b"ACB\x01", 0, 0, 0, 2**62, 0)
    await store.put(ref, header)
    with pytest.raises(BlobCorruptedError, match="max_blob_size"):
        await OffloadCodec(store).decode(ref)


def test_settings_validation() -> None:
    with pytest.raises(ConfigurationError):
        OffloadSettings(min_size_to_offload=0)
    with pytest.raises(ConfigurationError):
        OffloadSettings(compression="lz4")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        OffloadSettings(chunk_size=10)


async def test_cancelled_large_encode_leaves_nothing_half_written() -> None:
    """Cancelling an offload mid-way leaves no blob under the content key and no busy
    thread: the encoding thread notices cancellation between pieces and stops early."""
    store = CountingStore()
    codec = OffloadCodec(store, settings=OffloadSettings(chunk_size=1024 * 1024))
    value = [{"row": i, "text": "x" * 50} for i in range(400_000)]
    started = time.perf_counter()
    with anyio.move_on_after(0.02) as scope:
        await codec.encode(value)
    cancelled_after = time.perf_counter() - started
    assert scope.cancelled_caught
    keys = [k async for k in store.scan(REFERENCE_PREFIX)]
    assert [k for k in keys if k.count(":") == 1] == []
    # The same value encodes fine afterwards; the cancelled attempt stopped well before
    # a full encode would have (anyio returns only once the thread has returned).
    started = time.perf_counter()
    ref = await codec.encode(value)
    full = time.perf_counter() - started
    assert await store.exists(ref)
    assert cancelled_after < full / 2, (cancelled_after, full)


async def test_a_large_value_failing_midway_stores_nothing_and_frees_its_helper() -> None:
    store = MemoryStore()
    codec = OffloadCodec(store, JsonSerializer())
    # Pieces are digested in a helper before the last item turns out not to encode.
    value: list[Any] = ["x" * 1000] * 2000 + [object()]
    with pytest.raises(SerializationError, match="object"):
        await codec.encode(value)
    assert [key async for key in store.scan("")] == []
    assert all(helper.users == 0 for helper in _digest._helpers)
    # The codec (and the helper) go on working.
    ref = await codec.encode("y" * THREAD_MIN_CHARS)
    assert ref.startswith(REFERENCE_PREFIX)
    assert all(helper.users == 0 for helper in _digest._helpers)


async def test_a_large_value_kept_inline_frees_its_helper() -> None:
    settings = OffloadSettings(max_size_to_offload=THREAD_MIN_CHARS)
    codec = OffloadCodec(MemoryStore(), JsonSerializer(), settings=settings)
    text = "z" * (3 * THREAD_MIN_CHARS)
    assert await codec.encode(text) == json.dumps(text)
    assert all(helper.users == 0 for helper in _digest._helpers)
