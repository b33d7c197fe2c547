"""PieceDigest: the same key, checksum and stored bytes with or without the helper thread."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import xxhash
import zstandard

from acall import _digest
from acall._digest import PieceDigest

OVERLAP_BATCH = 2 << 20  # a few MiB: many pieces go through the helper


def _compressor(kind: str) -> Any:
    if kind == "zlib":
        return zlib.compressobj(6)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=3).compressobj()
    return None


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "zlib":
        return zlib.decompress(data)
    if kind == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _pieces(seed: int, total: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces: list[bytes] = []
    size = 0
    while size < total:
        n = rng.choice([0, 1, 100, 70_000, 300_000, OVERLAP_BATCH + 5])
        # Compressible but not constant: random words.
        words = [b"acall", b"digest", b"\xc3\xbc", b"42"]
        piece = b" ".join(rng.choice(words) for _ in range(n // 5))
        pieces.append(piece)
        size += len(piece)
    return pieces


@pytest.mark.parametrize("kind", ["none", "zlib", "zstd"])
@pytest.mark.parametrize(
    ("seed", "total"), [(1, 0), (2, 5_000), (3, 3 * OVERLAP_BATCH), (4, 9_000_000)]
)
def test_overlap_changes_nothing(kind: str, seed: int, total: int) -> None:
    pieces = _pieces(seed, total)
    whole = b"".join(pieces)
    results = []
    for overlap in (False, True):
        digest = PieceDigest(_compressor(kind), overlap=overlap)
        for piece in pieces:
            digest.feed(piece)
        results.append((*digest.finish(), digest.take(b"head")))
    assert results[0][:3] == results[1][:3]
    for sha_hex, raw_length, checksum, stored_length, blob in results:
        assert sha_hex == hashlib.sha256(whole).hexdigest()
        assert raw_length == len(whole)
        assert checksum == xxhash.xxh3_64_intdigest(whole)
        assert blob[:4] == b"head"
        assert stored_length == len(blob) - 4
        assert _decompress(kind, blob[4:]) == whole


def test_take_hands_out_the_head_and_the_stream() -> None:
    digest = PieceDigest(None, overlap=False)
    digest.feed(b"abc")
    digest.feed(b"de")
    assert digest.finish()[1:] == (5, xxhash.xxh3_64_intdigest(b"abcde"), 5)
    assert digest.take(b"head:") == b"head:abcde"
    with pytest.raises(RuntimeError, match="twice"):
        digest.take()


def test_large_values_are_digested_by_the_helper() -> None:
    seen: list[str] = []

    class Watching:
        """A compressor that records which thread compresses each batch."""

        def compress(self, data: bytes) -> bytes:
            seen.append(threading.current_thread().name)
            return data

        def flush(self) -> bytes:
            return b""

    digest = PieceDigest(Watching(), overlap=True)
    for piece in _pieces(5, 4 * OVERLAP_BATCH):
        digest.feed(piece)
    digest.finish()
    assert any(name.startswith("acall-digest") for name in seen), seen


def test_a_failing_batch_surfaces_in_finish() -> None:
    class Broken:
        def compress(self, data: bytes) -> bytes:
            raise MemoryError("no room for the batch")

        def flush(self) -> bytes:
            return b""

    def digest_all() -> None:
        digest = PieceDigest(Broken(), overlap=True)
        for piece in _pieces(6, 3 * OVERLAP_BATCH):
            digest.feed(piece)
        digest.finish()

    with pytest.raises(MemoryError, match="no room"):
        digest_all()


def _digest_in_child(expected: str, conn: Any) -> None:
    digest = PieceDigest(None, overlap=True)
    for piece in _pieces(7, 3 * OVERLAP_BATCH):
        digest.feed(piece)
    conn.send(digest.finish()[0] == expected)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_working_helper() -> None:
    # The helper pool exists in the parent; a forked child has none of its threads and
    # must start its own rather than wait for work that never runs.
    expected = hashlib.sha256(b"".join(_pieces(7, 3 * OVERLAP_BATCH))).hexdigest()
    parent = PieceDigest(None, overlap=True)
    for piece in _pieces(7, 3 * OVERLAP_BATCH):
        parent.feed(piece)
    assert parent.finish()[0] == expected
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    with warnings.catch_warnings():
        # Python 3.12 warns that forking a process with threads may deadlock: that is the
        # very case under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        child = ctx.Process(target=_digest_in_child, args=(expected, sender))
        child.start()
    try:
        assert receiver.poll(60), "the child's digest never finished"
        assert receiver.recv() is True
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def test_no_helper_thread_leaves_the_digest_to_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As at interpreter shutdown: no thread can be started.
    def refuse() -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(_digest, "_attach", refuse)
    pieces = _pieces(8, 3 * OVERLAP_BATCH)
    digest = PieceDigest(None, overlap=True)
    for piece in pieces:
        digest.feed(piece)
    sha_hex, raw_length, _, _ = digest.finish()
    assert sha_hex == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert raw_length == sum(map(len, pieces))
    assert digest.take() == b"".join(pieces)


def test_digests_at_once_share_the_helpers_and_stay_apart() -> None:
    # More digests than helpers, fed from several threads at once: each keeps its own
    # order and result, and every helper is released when they finish.
    inputs = [_pieces(20 + i, 2 * OVERLAP_BATCH) for i in range(5)]

    def run(pieces: list[bytes]) -> tuple[str, bytes]:
        digest = PieceDigest(zlib.compressobj(1), overlap=True)
        for piece in pieces:
            digest.feed(piece)
        return digest.finish()[0], digest.take()

    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(run, inputs))
    for pieces, (sha_hex, stored) in zip(inputs, results, strict=True):
        assert sha_hex == hashlib.sha256(b"".join(pieces)).hexdigest()
        assert zlib.decompress(stored) == b"".join(pieces)
    assert 1 <= len(_digest._helpers) <= _digest.HELPERS
    assert all(helper.users == 0 for helper in _digest._helpers)


def test_take_pieces_keeps_the_pieces_and_spends_the_digest() -> None:
    digest = PieceDigest(None, overlap=False)
    for piece in (b"ab", b"", b"cde"):
        digest.feed(piece)
    digest.finish()
    assert digest.take_pieces() == (b"ab", b"", b"cde")
    with pytest.raises(RuntimeError, match="twice"):
        digest.take()


def test_an_abandoned_digest_releases_its_helper() -> None:
    digest = PieceDigest(None, overlap=True)
    for piece in _pieces(11, 2 * OVERLAP_BATCH):
        digest.feed(piece)
    helper = digest._helper
    assert helper is not None
    digest.abandon()
    assert digest._helper is None
    assert helper.users == 0
    digest.abandon()  # twice is harmless
    # The helper still serves the next digest.
    again = PieceDigest(None, overlap=True)
    again.feed(b"x" * 100_000)
    assert again.finish()[0] == hashlib.sha256(b"x" * 100_000).hexdigest()
