"""Fuzzing the blob decoder: frame header, checksums, compression, chunk manifests.

Property: whatever bytes sit under a reference (and its chunk keys), fetching it either
returns exactly the text that was stored there, or raises BlobCorruptedError (or
BlobNotFoundError) naming that reference. Decompression is capped: a zip bomb is
refused without allocating what it would expand to.

Valid blobs are written through the real encoder (``OffloadCodec``) into a real
``MemoryStore``; the fuzzer then flips bits, truncates, splices, rewrites header fields,
drops, swaps and duplicates chunks.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
import time
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import pytest
import xxhash
import zstandard
from fuzz_support import (
    FUZZ_MARKS,
    assert_useful_error,
    corpus_json,
    count,
    fuzz_settings,
    fuzz_summary,  # noqa: F401 - the module's summary fixture
    timed,
)
from hypothesis import given
from hypothesis import strategies as st

from acall import BlobCorruptedError, BlobNotFoundError
from acall.codec import OffloadCodec, OffloadSettings
from acall.hashing import content_reference
from acall.stores.memory import MemoryStore

FUZZ_TARGETS = ["blob"]
pytestmark = FUZZ_MARKS

Compression = Literal["none", "zlib", "zstd"]
Entries = dict[str, bytes]
T = TypeVar("T")

_HEADER = struct.Struct("<4sBBHQQ")
_MANIFEST = struct.Struct("<IQ")
MiB = 1024 * 1024


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


async def _write(text: str, compression: Compression, chunk_size: int) -> tuple[str, Entries]:
    """Offload *text* with the real encoder; return its reference and every stored entry."""
    store = MemoryStore()
    settings = OffloadSettings(
        min_size_to_offload=1, compression=compression, chunk_size=chunk_size
    )
    codec = OffloadCodec(store, settings=settings)
    ref = await codec.commit(codec.route_text(text))  # stores *text* itself
    keys = [ref] + [k async for k in store.scan(ref + ":")]
    values = await store.get_many(keys)
    entries = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
    await store.close()
    return ref, entries


def write(text: str, compression: Compression = "none", chunk_size: int = 16 * MiB) -> Any:
    return run(lambda: _write(text, compression, chunk_size))


async def _read(entries: Entries, refs: list[str], verify: bool) -> dict[str, str]:
    store = MemoryStore()
    if entries:
        await store.put_many(entries)
    settings = OffloadSettings(local_cache_size=0, verify_content=verify)
    try:
        return await OffloadCodec(store, settings=settings).fetch_texts(refs)
    finally:
        await store.close()


def read(
    entries: Entries, ref: str, expected: str, *, verify: bool = True, also: Any = None
) -> Any:
    """Fetch *ref* from a store holding *entries* and check the property.

    :param also: another (reference, text) pair stored intact and fetched in the same
        call, to exercise the batched and parallel paths.
    """
    count("blob")
    refs = [ref] + ([also[0]] if also else [])
    try:
        texts = timed(lambda: run(lambda: _read(entries, refs, verify)))
    except (BlobCorruptedError, BlobNotFoundError) as exc:
        _check_error(exc, ref)
        return exc
    except Exception as exc:
        raise AssertionError(f"blob decoder leaked {type(exc).__name__}: {exc!r:.300}") from exc
    assert texts[ref] == expected, "a damaged blob decoded to a different text"
    if also:
        assert texts[also[0]] == also[1]
    return texts[ref]


def _check_error(exc: BlobCorruptedError | BlobNotFoundError, ref: str) -> None:
    assert_useful_error(exc, type(exc), ref)
    assert exc.reference == ref


# --------------------------------------------------------------------- valid blobs

_texts = st.one_of(
    st.text(min_size=1, max_size=3000),
    st.text(alphabet="ab", min_size=1, max_size=6000),  # compresses well: small chunks
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=5), st.integers(1, 2000)),
    st.sampled_from(['"x"', "é" * 1500, "\x00" * 3000, json.dumps(list(range(800)))]),
)
_COMPRESSIONS: tuple[Compression, ...] = ("none", "zlib", "zstd")
_compressions = st.sampled_from(_COMPRESSIONS)
_chunk_sizes = st.sampled_from([1024, 1500, 4096, 16 * MiB])


@given(_texts, _compressions, _chunk_sizes)
@fuzz_settings(0.5)
def test_valid_blobs_decode(text: str, compression: Compression, chunk_size: int) -> None:
    ref, entries = write(text, compression, chunk_size)
    assert ref == content_reference(text)
    assert read(entries, ref, text) == text


# ------------------------------------------------------------------------ mutations

_OPS = [
    "flip",
    "flip_header",
    "truncate",
    "extend",
    "compression",
    "kind",
    "raw_length",
    "checksum",
    "manifest",
    "drop_chunk",
    "swap_chunks",
    "copy_chunk",
    "extra_chunk",
    "other_blob",
    "reframe",
    "random",
    "drop_main",
]


def _chunk_keys(entries: Entries, ref: str) -> list[str]:
    return sorted((k for k in entries if k != ref), key=lambda k: int(k.rsplit(":", 1)[1]))


def _set_header(blob: bytes, **fields: int) -> bytes:
    if len(blob) < _HEADER.size:
        return blob
    magic, comp, kind, reserved, raw, check = _HEADER.unpack_from(blob)
    values = {"comp": comp, "kind": kind, "reserved": reserved, "raw": raw, "check": check}
    values.update(fields)
    header = _HEADER.pack(magic, *(values[k] for k in ("comp", "kind", "reserved", "raw", "check")))
    return header + blob[_HEADER.size :]


_u64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 4 * 1024 * MiB + 1]),
)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[Entries, str, str, bool, bool]:
    """A stored value and its entries after 1-3 mutations: (entries, ref, text, verify,
    crafted) where *crafted* marks a consistent re-framing only the content hash catches.
    """
    text = draw(_texts)
    ref, entries = write(text, draw(_compressions), draw(_chunk_sizes))
    crafted = False
    for _ in range(draw(st.integers(1, 3))):
        chunks = _chunk_keys(entries, ref)
        op = draw(st.sampled_from(_OPS))
        key = draw(st.sampled_from([ref, *chunks])) if ref in entries else None
        blob = entries.get(key, b"") if key else b""
        if op == "flip" and key and blob:
            pos = draw(st.integers(0, len(blob) - 1))
            entries[key] = (
                blob[:pos] + bytes([blob[pos] ^ (1 << draw(st.integers(0, 7)))]) + blob[pos + 1 :]
            )
        elif op == "flip_header" and entries.get(ref):
            main = entries[ref]
            pos = draw(st.integers(0, min(len(main), _HEADER.size + _MANIFEST.size) - 1))
            entries[ref] = main[:pos] + bytes([main[pos] ^ 0xFF]) + main[pos + 1 :]
        elif op == "truncate" and key:
            entries[key] = blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
        elif op == "extend" and key:
            entries[key] = blob + draw(st.binary(min_size=1, max_size=64) | st.just(blob[-8:]))
        elif op == "compression" and ref in entries:
            entries[ref] = _set_header(entries[ref], comp=draw(st.integers(0, 255)))
        elif op == "kind" and ref in entries:
            entries[ref] = _set_header(entries[ref], kind=draw(st.integers(0, 3)))
        elif op == "raw_length" and ref in entries:
            main = entries[ref]
            raw = _HEADER.unpack_from(main)[4] if len(main) >= _HEADER.size else 0
            new = draw(_u64 | st.integers(-3, 3).map(lambda d: max(0, raw + d)))  # noqa: B023
            entries[ref] = _set_header(main, raw=new)
        elif op == "checksum" and ref in entries:
            entries[ref] = _set_header(entries[ref], check=draw(_u64))
        elif op == "manifest" and ref in entries and len(entries[ref]) == 36:
            count_, stored = _MANIFEST.unpack_from(entries[ref], _HEADER.size)
            count_ = draw(
                st.sampled_from([0, 1, count_ - 1, count_ + 1, 2**32 - 1])
                | st.integers(0, 2**32 - 1)
            )
            stored = draw(st.sampled_from([0, stored - 1, stored + 1, 2**64 - 1, stored]))
            entries[ref] = entries[ref][: _HEADER.size] + _MANIFEST.pack(
                max(0, count_), max(0, stored)
            )
        elif op == "drop_chunk" and chunks:
            del entries[draw(st.sampled_from(chunks))]
        elif op == "swap_chunks" and len(chunks) > 1:
            a, b = draw(st.permutations(chunks))[:2]
            entries[a], entries[b] = entries[b], entries[a]
        elif op == "copy_chunk" and len(chunks) > 1:
            a, b = draw(st.permutations(chunks))[:2]
            entries[b] = entries[a]
        elif op == "extra_chunk" and ref in entries:
            entries[f"{ref}:{len(chunks)}"] = draw(st.binary(min_size=1, max_size=2048))
        elif op == "other_blob":
            # A valid blob of another text under this reference (stored under a wrong key).
            other = draw(_texts.filter(lambda t: t != text))
            _, other_entries = write(other, draw(_compressions), draw(_chunk_sizes))
            other_ref = next(iter(other_entries))
            entries = {k.replace(other_ref, ref): v for k, v in other_entries.items()}
            crafted = True
        elif op == "reframe" and ref in entries:
            # Consistent framing (length, xxh3) around a different text: only the
            # content hash (verify_content) can tell.
            other = (draw(_texts) + "!").encode("utf-8")
            header = _HEADER.pack(b"ACB\x01", 0, 0, 0, len(other), xxhash.xxh3_64_intdigest(other))
            entries = {ref: header + other}
            crafted = True
        elif op == "random":
            entries[ref] = draw(st.binary(max_size=100))
        elif op == "drop_main":
            entries.pop(ref, None)
    verify = True if crafted else draw(st.booleans())
    return entries, ref, text, verify, crafted


@given(mutations())
@fuzz_settings(3.0)
def test_mutated_blobs(case: tuple[Entries, str, str, bool, bool]) -> None:
    entries, ref, text, verify, _ = case
    read(entries, ref, text, verify=verify)


@given(mutations(), st.sampled_from(["a" * 5000, "intact neighbour"]))
@fuzz_settings(1.0)
def test_mutated_blob_fetched_with_an_intact_one(
    case: tuple[Entries, str, str, bool, bool], neighbour: str
) -> None:
    entries, ref, text, verify, _ = case
    other_ref, other_entries = write(neighbour, "zlib", 1024)
    if other_ref == ref:
        return
    read({**entries, **other_entries}, ref, text, verify=verify, also=(other_ref, neighbour))


@given(st.binary(max_size=300), st.booleans())
@fuzz_settings(1.0)
def test_random_bytes_under_a_reference(blob: bytes, framed: bool) -> None:
    ref = content_reference('"random"')
    if framed:  # past the magic, so the rest of the header is what gets tested
        blob = b"ACB\x01" + blob
    read({ref: blob}, ref, '"random"')


@st.composite
def large_mutations(draw: st.DrawFn) -> tuple[Entries, str, str]:
    """Values above the thread threshold (decoded in worker threads, in parallel)."""
    text = "x" * draw(st.integers(256 * 1024, 300 * 1024))
    ref, entries = write(text, draw(_compressions), draw(st.sampled_from([64 * 1024, 16 * MiB])))
    key = draw(st.sampled_from(sorted(entries)))
    pos = draw(st.integers(0, len(entries[key]) - 1))
    blob = entries[key]
    entries[key] = blob[:pos] + bytes([blob[pos] ^ 1]) + blob[pos + 1 :]
    return entries, ref, text


@given(large_mutations())
@fuzz_settings(0.05)
def test_mutated_large_blobs(case: tuple[Entries, str, str]) -> None:
    entries, ref, text = case
    read(entries, ref, text)


# --------------------------------------------------------------- decompression bombs


@functools.cache
def _bomb(compression: Literal["zlib", "zstd"], expanded: int) -> bytes:
    """*expanded* zero bytes, compressed in 1 MiB pieces (never held whole)."""
    piece = bytes(MiB)
    comp: Any = (
        zlib.compressobj(9)
        if compression == "zlib"
        else zstandard.ZstdCompressor(level=3).compressobj()
    )
    out = [comp.compress(piece) for _ in range(expanded // MiB)]
    out.append(comp.flush())
    return b"".join(out)


def _frame(compression: int, declared: int, body: bytes, kind: int = 0) -> bytes:
    return _HEADER.pack(b"ACB\x01", compression, kind, 0, declared, 0) + body


def _peak_while(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run *fn*; return its result (or exception) and the peak traced allocation."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        try:
            result: Any = fn()
        except Exception as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BOMBS = {
    # name: (compression id, expanded size)
    "zlib-64MiB": (1, 64 * MiB),
    "zstd-512MiB": (2, 512 * MiB),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.parametrize("layout", ["single", "chunked"])
def test_zip_bomb_is_refused_without_expanding(name: str, layout: str) -> None:
    """A blob declaring 1 KiB whose stream inflates to hundreds of MiB stops at 1 KiB + 1."""
    comp_id, expanded = BOMBS[name]
    body = _bomb("zlib" if comp_id == 1 else "zstd", expanded)
    ref = content_reference(f'"{name}"')
    if layout == "single":
        entries = {ref: _frame(comp_id, 1024, body)}
    else:
        size = 4096
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        entries = {ref: _frame(comp_id, 1024, _MANIFEST.pack(len(pieces), len(body)), kind=1)}
        entries.update({f"{ref}:{i}": p for i, p in enumerate(pieces)})
    started = time.perf_counter()
    result, peak = _peak_while(lambda: read(entries, ref, "never"))
    assert isinstance(result, BlobCorruptedError), result
    assert "more than its declared 1024 bytes" in str(result)
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB while refusing a {expanded // MiB} MiB bomb"
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("compression", [1, 2])
def test_declared_size_is_not_allocated_up_front(compression: int) -> None:
    """A tiny (truncated) stream declaring 200 MiB: refused without a 200 MiB buffer."""
    text = b"abc"
    body = zlib.compress(text) if compression == 1 else zstandard.ZstdCompressor().compress(text)
    ref = content_reference('"tiny"')
    result, peak = _peak_while(lambda: read({ref: _frame(compression, 200 * MiB, body)}, ref, ""))
    assert isinstance(result, BlobCorruptedError), result
    assert "truncated" in str(result)
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB for a {len(body)}-byte blob"


def test_bomb_above_max_blob_size_is_refused_before_decompressing() -> None:
    body = _bomb("zstd", 512 * MiB)
    ref = content_reference('"big"')

    async def fetch() -> dict[str, str]:
        store = MemoryStore()
        await store.put(ref, _frame(2, 512 * MiB, body))
        codec = OffloadCodec(store, settings=OffloadSettings(max_blob_size=MiB))
        return await codec.fetch_texts([ref])

    result, peak = _peak_while(lambda: run(fetch))
    assert isinstance(result, BlobCorruptedError), result
    assert "max_blob_size" in str(result)
    assert ref in str(result)
    assert peak < 4 * MiB


@pytest.mark.parametrize("chunks", [2**32 - 1, 10**6])
def test_manifest_with_absurd_chunk_count(chunks: int) -> None:
    """A 36-byte manifest claiming billions of chunks fails fast, in bounded memory."""
    ref = content_reference('"manifest"')
    manifest = _frame(0, 100 * MiB, _MANIFEST.pack(chunks, 100 * MiB), kind=1)
    started = time.perf_counter()
    result, peak = _peak_while(lambda: read({ref: manifest}, ref, ""))
    assert isinstance(result, BlobCorruptedError), result
    assert time.perf_counter() - started < 2
    assert peak < 8 * MiB


# ---------------------------------------------------------------------------- corpus

BLOB_CORPUS = list(corpus_json("blob"))


def test_corpus_is_not_empty() -> None:
    assert len(BLOB_CORPUS) >= 10
    for path, case in BLOB_CORPUS:
        assert case.get("description"), f"{path.name} has no description"


@pytest.mark.parametrize(("path", "case"), BLOB_CORPUS, ids=[p.name for p, _ in BLOB_CORPUS])
def test_corpus(path: Path, case: dict[str, Any]) -> None:
    entries = {k: base64.b64decode(v) for k, v in case["entries"].items()}
    result = read(entries, case["reference"], case.get("text", ""), verify=case.get("verify", True))
    if "error" in case:
        assert isinstance(result, BlobCorruptedError | BlobNotFoundError), result
        assert case["error"] in str(result), str(result)
    else:
        assert result == case["text"]
