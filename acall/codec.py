"""Offload codec: inline vs reference routing, blob framing, chunking and a local cache.

A serialized argument value is either *inline* (the serializer's text) or, when the
text is at least ``min_size_to_offload`` characters long, a *reference*
``"__pynenc__client_data__:" + sha256(text.encode("utf-8")).hexdigest()`` whose text is
kept in a :class:`~acall.stores.Store`. The reference is what the args_id hashes, so every
process with the same settings computes the same args_id.

Blob framing (all integers little-endian)::

    offset size field
    0      4    magic b"ACB\\x01"
    4      1    compression: 0 none, 1 zlib, 2 zstd
    5      1    kind: 0 single blob, 1 chunk manifest
    6      2    reserved (0)
    8      8    raw length: bytes of the UTF-8 serialized text
    16     8    xxh3_64 of the UTF-8 serialized text
    24     ...  single: the stored stream (compressed or not)
                manifest: u32 chunk count, u64 stored length; the stored stream is split
                over keys "<reference>:<index>" (index from 0)

Readers need no configuration: compression is recorded in the frame. A blob that is
truncated, fails its checksum, decompresses to the wrong size (or would decompress past
its declared size: a zip bomb) or whose text does not hash to its reference raises
:class:`~acall.errors.BlobCorruptedError` naming the reference; it never yields a value.

Large values are encoded, hashed and framed in worker threads, in pieces, so the event
loop keeps running; small ones are handled on the loop, where a thread hop would cost
more than the work.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, Literal

import anyio
import anyio.from_thread
import anyio.to_thread
import attrs
import xxhash

from acall._concurrency import SingleFlight
from acall._digest import PieceDigest
from acall._slots import slot_constructor
from acall.errors import (
    BlobCorruptedError,
    BlobNotFoundError,
    ConfigurationError,
)
from acall.hashing import REFERENCE_PATTERN, REFERENCE_PREFIX, validate_reference
from acall.serializers import JsonSerializer, Serializer
from acall.stores.base import Store

__all__ = [
    "Compression",
    "LoadFailure",
    "OffloadCodec",
    "OffloadSettings",
    "Prepared",
    "chunk_key",
    "chunk_owner",
    "estimate_chars",
]

logger = logging.getLogger("acall.codec")

Compression = Literal["none", "zlib", "zstd"]

_MAGIC: Final = b"ACB\x01"
_HEADER: Final = struct.Struct("<4sBBHQQ")
_MANIFEST: Final = struct.Struct("<IQ")
_CODEC_IDS: Final[dict[str, int]] = {"none": 0, "zlib": 1, "zstd": 2}
_CODEC_NAMES: Final = {v: k for k, v in _CODEC_IDS.items()}
_KIND_SINGLE: Final = 0
_KIND_MANIFEST: Final = 1
# Largest piece asked of the zstd reader at once: read(n) allocates n bytes up front,
# and the declared size it is derived from comes from the (untrusted) frame header.
_ZSTD_READ: Final = 1024 * 1024

#: Values whose estimated size is at least this many characters are encoded in a
#: worker thread; below it, the thread hop costs more than the encoding.
THREAD_MIN_CHARS: Final = 256 * 1024


def _names(names: Iterable[str]) -> frozenset[str]:
    if isinstance(names, str):
        raise ConfigurationError(f"disable_offload takes a collection of names, got {names!r}")
    return frozenset(names)


@attrs.frozen(slots=True)
class OffloadSettings:
    """When and how argument values are moved to the store.

    :ivar min_size_to_offload: serialized length (characters) from which a value is
        offloaded. Must be equal on every process of a cluster (it changes args_ids).
    :ivar max_size_to_offload: values longer than this stay inline (0 = no limit).
    :ivar disable_offload: argument names never offloaded; ``"*"`` disables all.
    :ivar local_cache_size: fetched blob texts kept per process (0 disables the cache).
    :ivar local_cache_bytes: bound on the cached texts' total size.
    :ivar compression: how new blobs are compressed (readers detect it from the frame).
    :ivar compression_level: zlib 1-9 / zstd 1-22.
    :ivar chunk_size: stored bytes per chunk for large blobs (capped by the store).
    :ivar blob_ttl: seconds offloaded blobs live in the store (None = forever).
    :ivar verify_content: check that fetched text hashes to its reference.
    :ivar max_blob_size: largest raw blob accepted when reading (refuses absurd headers).
    """

    min_size_to_offload: int = 1024
    max_size_to_offload: int = 0
    disable_offload: frozenset[str] = attrs.field(default=frozenset(), converter=_names)
    local_cache_size: int = 256
    local_cache_bytes: int = 64 * 1024 * 1024
    compression: Compression = "none"
    compression_level: int = 3
    chunk_size: int = 16 * 1024 * 1024
    blob_ttl: float | None = None
    verify_content: bool = True
    max_blob_size: int = 4 * 1024 * 1024 * 1024

    def __attrs_post_init__(self) -> None:
        if self.min_size_to_offload < 1:
            raise ConfigurationError("min_size_to_offload must be >= 1")
        if self.max_size_to_offload < 0:
            raise ConfigurationError("max_size_to_offload must be >= 0 (0 means no limit)")
        if self.compression not in _CODEC_IDS:
            raise ConfigurationError(
                f"compression must be one of {sorted(_CODEC_IDS)}, got {self.compression!r}"
            )
        if self.compression == "zstd":
            _zstd()
        if self.chunk_size < 1024:
            raise ConfigurationError("chunk_size must be at least 1024 bytes")

    def offload_allowed(self, name: str | None) -> bool:
        """Whether the argument *name* may be offloaded under these settings."""
        if "*" in self.disable_offload:
            return False
        return name is None or name not in self.disable_offload


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise ConfigurationError(
            "zstd compression needs the zstandard package: pip install 'acall[zstd]'"
        ) from None
    return zstandard


# --------------------------------------------------------------------------- sizing

#: Exact types whose serialized text is nearly always short (see OffloadCodec.encode_now).
_SCALARS: Final = frozenset({int, float, bool, type(None)})


def estimate_chars(value: Any, limit: int) -> int:
    """Cheap upper-bound-ish estimate of a value's JSON size, stopping past *limit*.

    Visits at most a few hundred nodes; a value too big to inspect that quickly counts
    as large, which only means it is encoded in a thread.
    """
    total = 0
    budget = 256
    stack = [value]
    while stack:
        budget -= 1
        if budget < 0:
            return limit + 1
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            if len(item) > budget:
                return limit + 1
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            if len(item) > budget:
                return limit + 1
            stack.extend(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            total += 2 * len(item)
        elif isinstance(item, (int, float, bool)) or item is None:
            total += 24
        else:
            # Dataclasses, attrs and plain objects: look at their fields, which is what
            # typed arguments and to_json() will turn into JSON.
            fields = getattr(item, "__dict__", None)
            if fields is None:
                slots = getattr(type(item), "__slots__", ())
                fields = {n: getattr(item, n, None) for n in slots if isinstance(n, str)}
            total += 24
            if len(fields) > budget:
                return limit + 1
            stack.extend(fields.values())
        if total > limit:
            return total
    return total


# -------------------------------------------------------------------------- framing


@attrs.frozen(slots=True)
class Prepared:
    """An encoded value: inline text, or a reference with what to store under it.

    ``blob`` is the framed single blob. A value too large for one blob has no ``blob``
    but its stored stream in ``pieces`` instead, cut into chunks at upload.
    """

    inline: str | None
    reference: str | None = None
    raw_length: int = 0
    checksum: int = 0
    compression: int = 0
    blob: bytes = b""
    pieces: tuple[bytes, ...] | None = None

    @property
    def chunked(self) -> bool:
        """Whether the value is stored in chunks behind a manifest."""
        return self.pieces is not None

    @property
    def stored_length(self) -> int:
        """Bytes of the stored stream (without the blob header)."""
        if self.pieces is not None:
            return sum(map(len, self.pieces))
        return max(0, len(self.blob) - _HEADER.size)


_new_prepared: Final = slot_constructor(
    Prepared, ("t", "ref", 1, 2, 3, b"blob", (b"piece",)), acyclic=()
)


def _inline(text: str) -> Prepared:
    """``Prepared(inline=text)``, faster where the C extension is built (made for every
    argument and result that stays inline; see :mod:`acall._slots`)."""
    return _new_prepared(text, None, 0, 0, 0, b"", None)


def _compressor(settings: OffloadSettings) -> Any:
    if settings.compression == "zlib":
        return zlib.compressobj(settings.compression_level)
    if settings.compression == "zstd":
        return _zstd().ZstdCompressor(level=settings.compression_level).compressobj()
    return None


def chunk_key(reference: str, index: int) -> str:
    """The store key of chunk *index* of the blob under *reference*."""
    return f"{reference}:{index}"


_CHUNK_KEY: Final = re.compile(f"({REFERENCE_PATTERN.pattern}):[0-9]+")


def chunk_owner(key: str) -> str | None:
    """The reference whose chunk *key* is, or ``None`` if *key* is no chunk key."""
    match = _CHUNK_KEY.fullmatch(key)
    return None if match is None else match[1]


def _split_chunks(pieces: Sequence[bytes], chunk_size: int) -> Iterator[bytes]:
    """Regroup stored pieces into chunks of exactly *chunk_size* (the last may be shorter).

    Each chunk is one ``bytes.join`` of whole pieces and, at its edges, copied slices of
    the pieces it shares with its neighbours (no larger than a piece). All of them are
    exact ``bytes``, so CPython releases the GIL for the join's copy, which on a large
    chunk takes milliseconds. It keeps the GIL through a join of memoryviews: chunks cut
    that way held up the event loop for the whole copy of each chunk.
    """
    parts: list[bytes] = []
    size = 0
    for piece in pieces:
        start, end = 0, len(piece)
        while start < end:
            take = min(end - start, chunk_size - size)
            parts.append(piece if take == end else piece[start : start + take])
            size += take
            start += take
            if size == chunk_size:
                yield b"".join(parts)
                parts, size = [], 0
    if parts:
        yield b"".join(parts)


def _frame_blobs(prep: Prepared, chunk_size: int) -> tuple[bytes, dict[str, bytes]]:
    """Return (blob under the reference, extra chunk blobs by key)."""
    if prep.pieces is None:
        return prep.blob, {}
    assert prep.reference is not None
    chunks = {
        chunk_key(prep.reference, i): c
        for i, c in enumerate(_split_chunks(prep.pieces, chunk_size))
    }
    header = _HEADER.pack(
        _MAGIC, prep.compression, _KIND_MANIFEST, 0, prep.raw_length, prep.checksum
    )
    return header + _MANIFEST.pack(len(chunks), prep.stored_length), chunks


@attrs.frozen(slots=True)
class _Header:
    compression: int
    kind: int
    raw_length: int
    checksum: int
    chunk_count: int = 0
    stored_length: int = 0


def _parse_header(ref: str, blob: bytes, max_blob_size: int) -> _Header:
    if len(blob) < _HEADER.size:
        raise BlobCorruptedError(
            f"blob {ref} is truncated ({len(blob)} bytes, shorter than its header)",
            reference=ref,
        )
    magic, compression, kind, _, raw_length, checksum = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise BlobCorruptedError(
            f"blob {ref} has no acall frame (magic {magic!r}); it was not written by acall "
            "or is corrupted",
            reference=ref,
        )
    if compression not in _CODEC_NAMES or kind not in (_KIND_SINGLE, _KIND_MANIFEST):
        raise BlobCorruptedError(
            f"blob {ref} has an unknown compression ({compression}) or kind ({kind})",
            reference=ref,
        )
    if raw_length > max_blob_size:
        raise BlobCorruptedError(
            f"blob {ref} declares {raw_length} bytes, above max_blob_size={max_blob_size}; "
            "refusing to load it",
            reference=ref,
        )
    if kind == _KIND_SINGLE:
        return _Header(compression, kind, raw_length, checksum)
    if len(blob) != _HEADER.size + _MANIFEST.size:
        raise BlobCorruptedError(f"chunk manifest of {ref} has the wrong size", reference=ref)
    count, stored_length = _MANIFEST.unpack_from(blob, _HEADER.size)
    # Written manifests list at least one chunk, each non-empty, and store uncompressed
    # data as is; a manifest that disagrees with itself is refused before any chunk
    # key is made from its (possibly absurd) count.
    if not 0 < count <= stored_length or (
        compression == _CODEC_IDS["none"] and stored_length != raw_length
    ):
        raise BlobCorruptedError(
            f"chunk manifest of {ref} is inconsistent: {count} chunks holding {stored_length} "
            f"bytes for {raw_length} raw bytes",
            reference=ref,
        )
    return _Header(compression, kind, raw_length, checksum, count, stored_length)


class _Decoder:
    """Turns stored bytes back into the raw text, refusing to exceed the declared size."""

    def __init__(self, ref: str, header: _Header) -> None:
        self.ref = ref
        self.header = header
        self.out = bytearray()
        self._zlib = zlib.decompressobj() if header.compression == _CODEC_IDS["zlib"] else None
        # zstandard's incremental decompressor has no output cap, so zstd input is
        # buffered and decompressed once through a reader asked for at most size + 1.
        self._zstd_input: list[bytes] | None = (
            [] if header.compression == _CODEC_IDS["zstd"] else None
        )

    def feed(self, data: bytes) -> None:
        room = self.header.raw_length - len(self.out)
        if self._zstd_input is not None:
            self._zstd_input.append(data)
        elif self._zlib is not None:
            # max_length caps the output of one call: a zip bomb stops at room + 1.
            self.out += self._zlib.decompress(data, room + 1)
            if self._zlib.unconsumed_tail or len(self.out) > self.header.raw_length:
                self._too_long()
        else:
            if len(data) > room:
                self._too_long()
            self.out += data

    def _drain_zstd(self) -> None:
        if self._zstd_input is None:
            return
        source = io.BytesIO(b"".join(self._zstd_input))
        self._zstd_input = None
        limit = self.header.raw_length + 1
        with _zstd().ZstdDecompressor().stream_reader(source, read_across_frames=True) as reader:
            while len(self.out) < limit:
                block = reader.read(min(limit - len(self.out), _ZSTD_READ))
                if not block:
                    break
                self.out += block
        if len(self.out) > self.header.raw_length:
            self._too_long()

    def _too_long(self) -> None:
        raise BlobCorruptedError(
            f"blob {self.ref} decodes to more than its declared {self.header.raw_length} bytes",
            reference=self.ref,
        )

    def finish(self, verify_content: bool) -> str:
        h = self.header
        try:
            self._drain_zstd()
        except BlobCorruptedError:
            raise
        except Exception as exc:
            raise BlobCorruptedError(
                f"blob {self.ref} fails to decompress: {exc}", reference=self.ref
            ) from None
        if len(self.out) != h.raw_length:
            raise BlobCorruptedError(
                f"blob {self.ref} is truncated: {len(self.out)} of {h.raw_length} bytes",
                reference=self.ref,
            )
        if xxhash.xxh3_64_intdigest(self.out) != h.checksum:
            raise BlobCorruptedError(
                f"blob {self.ref} fails its checksum (stored data was altered)",
                reference=self.ref,
            )
        if verify_content:
            digest = hashlib.sha256(self.out).hexdigest()
            if REFERENCE_PREFIX + digest != self.ref:
                raise BlobCorruptedError(
                    f"blob {self.ref} holds text whose sha256 is {digest}: it was stored under "
                    "the wrong key",
                    reference=self.ref,
                )
        try:
            return self.out.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BlobCorruptedError(
                f"blob {self.ref} is not valid UTF-8: {exc}", reference=self.ref
            ) from None


def _decode_single(ref: str, blob: bytes, header: _Header, verify: bool) -> str:
    dec = _Decoder(ref, header)
    try:
        dec.feed(blob[_HEADER.size :])
    except zlib.error as exc:
        raise BlobCorruptedError(f"blob {ref} fails to decompress: {exc}", reference=ref) from None
    except BlobCorruptedError:
        raise
    except Exception as exc:  # zstd raises its own error type
        raise BlobCorruptedError(f"blob {ref} fails to decompress: {exc}", reference=ref) from None
    return dec.finish(verify)


@attrs.frozen
class LoadFailure:
    """A value that could not be deserialized, in place of the value (see
    :meth:`OffloadCodec.fetch_loaded`)."""

    error: Exception


def _decode_and_load(
    ref: str, blob: bytes, header: _Header, verify: bool, loads: Callable[[str], Any]
) -> tuple[str, Any | LoadFailure]:
    """Check and decode a blob, then deserialize its text, in one worker thread."""
    text = _decode_single(ref, blob, header, verify)
    try:
        return text, loads(text)
    except Exception as exc:
        return text, LoadFailure(exc)


# ---------------------------------------------------------------------------- codec


class OffloadCodec:
    """Routes serialized values inline or to a store, and loads them back.

    One codec is shared by every call of an app in a process: it owns the set of
    references known to be stored, the single-flight table of fetches in progress and
    the local LRU of fetched texts (texts, not objects: every load decodes afresh, so
    two invocations never share a mutable value).
    """

    #: Batch size for fetching the chunks of one large blob (bounds memory in flight).
    CHUNK_FETCH_BATCH: Final = 4
    #: Blobs at least this large are checked with ``exists`` before uploading.
    EXISTS_CHECK_MIN: Final = 1024 * 1024
    _KNOWN_MAX: Final = 65536

    def __init__(
        self,
        store: Store,
        serializer: Serializer | None = None,
        settings: OffloadSettings | None = None,
        *,
        reuse_window: float | None = None,
    ) -> None:
        self.store = store
        self.serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        self.settings = settings if settings is not None else OffloadSettings()
        #: Seconds a blob this process stored (or touched) is trusted to still be there
        #: without asking the store again; ``None``: for ever. Must stay well below the
        #: blob collector's grace period when one runs (see :mod:`acall.lifecycle`).
        self.reuse_window = reuse_window
        # Reference -> monotonic time it was last stored or touched by this process.
        self._known: OrderedDict[str, float] = OrderedDict()
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_bytes = 0
        self._fetches: SingleFlight[str, str] = SingleFlight()
        self._uploads: SingleFlight[str, None] = SingleFlight()
        #: Counters for progress reports and tests.
        self.stats: dict[str, int] = {
            "inline_chars": 0,
            "offloaded_bytes": 0,
            "uploads": 0,
            "uploads_skipped": 0,
            "fetches": 0,
            "cache_hits": 0,
        }

    @property
    def chunk_size(self) -> int:
        """Bytes per stored chunk: the setting, capped by the store's comfortable size."""
        return min(self.settings.chunk_size, self.store.max_value_size)

    # -- encoding --------------------------------------------------------------------

    async def encode(self, value: Any, *, name: str | None = None) -> str:
        """Serialize *value*; offload it when large; return inline text or a reference.

        :raises SerializationError: when the value cannot be serialized.
        :raises StoreError: when the store write fails.
        """
        text = self.encode_now(value)
        if text is not None:
            return text
        offload = self.settings.offload_allowed(name)
        if estimate_chars(value, THREAD_MIN_CHARS) < THREAD_MIN_CHARS:
            prep = self.prepare_small(value, offload=offload)
            if prep.inline is not None:  # the usual case (a small result): no await
                return self._kept_inline(prep.inline)
        else:
            prep = await self.prepare_large(value, offload=offload)
        return await self.commit(prep)

    def encode_now(self, value: Any) -> str | None:
        """:meth:`encode` of a number, a flag or ``None`` (the usual result) whose text
        stays inline, here and now; ``None`` for anything else (left to :meth:`encode`).

        :raises SerializationError: when the value cannot be serialized.
        """
        if type(value) not in _SCALARS:
            return None
        text = self.serializer.dumps(value)
        if len(text) >= self.settings.min_size_to_offload:
            return None  # (a huge int) sized and routed by encode()
        return self._kept_inline(text)

    def prepare_small(self, value: Any, *, offload: bool = True) -> Prepared:
        """Encode a small value on the calling thread (hashing it if it is offloaded)."""
        return self._route_text(self.serializer.dumps(value), offload)

    def route_text(self, text: str, *, offload: bool = True) -> Prepared:
        """Route already-serialized small text on the calling thread: inline or hashed."""
        return self._route_text(text, offload)

    async def prepare_large(
        self,
        value: Any,
        *,
        offload: bool = True,
        transform: Callable[[Any], Any] | None = None,
    ) -> Prepared:
        """Encode, hash and compress a large value in a worker thread, in pieces.

        :param transform: applied to the value first, in the thread (typed arguments).
        """
        return await anyio.to_thread.run_sync(self._prepare_large, value, offload, transform)

    def _prepare_large(
        self, value: Any, offload: bool, transform: Callable[[Any], Any] | None
    ) -> Prepared:
        if transform is not None:
            value = transform(value)
        iter_dumps = getattr(self.serializer, "iter_dumps", None)
        pieces: Iterable[str] = (
            iter_dumps(value) if iter_dumps is not None else (self.serializer.dumps(value),)
        )
        if not offload:
            return _inline(self._join(pieces))
        # Each piece is digested as it comes (partly in a helper thread), before it is
        # known whether the whole is large enough to offload: nearly always it is. Past
        # max_size_to_offload it will stay inline, so digesting stops there.
        limit = self.settings.max_size_to_offload
        # The text itself is kept only while it may yet stay inline.
        texts: list[str] | None = []
        chars = 0
        digest = PieceDigest(_compressor(self.settings), overlap=True)
        try:
            for piece in _checked(pieces):
                chars += len(piece)
                if texts is not None:
                    texts.append(piece)
                    if not limit and chars >= self.settings.min_size_to_offload:
                        texts = None  # offloaded for sure
                if not limit or chars <= limit:
                    digest.feed(piece.encode("utf-8"))
            if texts is not None and not self._should_offload(chars):
                return _inline("".join(texts))
            return self._reference(digest)
        finally:
            digest.abandon()  # frees the helper unless finished: failed or kept inline

    @staticmethod
    def _join(pieces: Iterable[str]) -> str:
        return "".join(_checked(pieces))

    def _should_offload(self, chars: int) -> bool:
        s = self.settings
        if chars < s.min_size_to_offload:
            return False
        if s.max_size_to_offload and chars > s.max_size_to_offload:
            logger.warning(
                "value of %d characters exceeds max_size_to_offload=%d; kept inline",
                chars,
                s.max_size_to_offload,
            )
            return False
        return True

    def _route_text(self, text: str, offload: bool) -> Prepared:
        if not offload or not self._should_offload(len(text)):
            return _inline(text)
        digest = PieceDigest(_compressor(self.settings), overlap=False)
        digest.feed(text.encode("utf-8"))
        return self._reference(digest)

    def _reference(self, digest: PieceDigest) -> Prepared:
        sha_hex, raw_len, checksum, stored_len = digest.finish()
        compression = _CODEC_IDS[self.settings.compression]
        blob = b""
        pieces = None
        if stored_len + _HEADER.size > self.chunk_size:
            pieces = digest.take_pieces()  # cut into chunks at upload, behind a manifest
        else:
            blob = digest.take(
                _HEADER.pack(_MAGIC, compression, _KIND_SINGLE, 0, raw_len, checksum)
            )
        return Prepared(
            inline=None,
            reference=REFERENCE_PREFIX + sha_hex,
            raw_length=raw_len,
            checksum=checksum,
            compression=compression,
            blob=blob,
            pieces=pieces,
        )

    def _kept_inline(self, text: str) -> str:
        self.stats["inline_chars"] += len(text)
        return text

    async def commit(self, prep: Prepared) -> str:
        """Store a prepared reference (once per process) and return the serialized value."""
        if prep.inline is not None:
            return self._kept_inline(prep.inline)
        ref = prep.reference
        assert ref is not None
        known_at = self._known.get(ref)
        if known_at is not None and (
            self.reuse_window is None or time.monotonic() - known_at < self.reuse_window
        ):
            self._known.move_to_end(ref)
            self.stats["uploads_skipped"] += 1
            return ref
        await self._uploads.run(ref, lambda: self._upload(prep))
        return ref

    async def _upload(self, prep: Prepared) -> None:
        ref = prep.reference
        assert ref is not None
        size = prep.stored_length
        # A touch, not a mere existence check: it also restarts the blob's idle time,
        # so the collector cannot remove it before this call's record is visible.
        if size >= self.EXISTS_CHECK_MIN and (await self.store.touch_many([ref]))[0]:
            self.stats["uploads_skipped"] += 1
        else:
            if prep.chunked and size >= self.EXISTS_CHECK_MIN:
                blob, chunks = await anyio.to_thread.run_sync(_frame_blobs, prep, self.chunk_size)
            else:
                blob, chunks = _frame_blobs(prep, self.chunk_size)
            ttl = self.settings.blob_ttl
            if chunks:
                # Chunks first, the reference last: a reader never sees a reference
                # whose chunks are not all there (nor does an interrupted upload leave one).
                for batch in _batched(list(chunks.items()), self.CHUNK_FETCH_BATCH):
                    await self.store.put_many(dict(batch), ttl=ttl)
            await self.store.put(ref, blob, ttl=ttl)
            self.stats["uploads"] += 1
            self.stats["offloaded_bytes"] += prep.raw_length
        self._remember(ref)

    def _remember(self, ref: str) -> None:
        self._known[ref] = time.monotonic()
        self._known.move_to_end(ref)
        if len(self._known) > self._KNOWN_MAX:
            self._known.popitem(last=False)

    # -- decoding --------------------------------------------------------------------

    async def fetch_texts(self, refs: Iterable[str]) -> dict[str, str]:
        """Return the stored text of every reference, in as few round trips as possible.

        References are validated first; cached texts cost nothing; references being
        fetched by another task are awaited, not fetched twice; the rest are fetched in
        one ``get_many`` (plus one more round trip per batch of chunks for large blobs).

        :raises InvalidKeyError: for a malformed reference (before any store call).
        :raises BlobNotFoundError: naming a reference that is not stored.
        :raises BlobCorruptedError: naming a reference whose blob fails its checks.
        """
        return await self._fetch(refs, None)

    async def fetch_loaded(
        self, refs: Iterable[str]
    ) -> tuple[dict[str, str], dict[str, Any | LoadFailure]]:
        """:meth:`fetch_texts`, plus the values of the large blobs it fetched itself.

        Each such blob is checked and deserialized by the same worker thread, so one
        value is parsed (holding the GIL) while the other blobs are still being hashed
        (which releases it). Values are keyed by reference; a deserialization error is
        returned as a :class:`LoadFailure` in its place, for the caller to attribute.
        Cached texts and texts fetched by another task come without a value.
        """
        values: dict[str, Any | LoadFailure] = {}
        return await self._fetch(refs, values), values

    async def _fetch(
        self, refs: Iterable[str], values: dict[str, Any | LoadFailure] | None
    ) -> dict[str, str]:
        """The texts of *refs*; with *values*, large blobs fetched here are also
        deserialized into it (see :meth:`fetch_loaded`)."""
        wanted = list(dict.fromkeys(validate_reference(r) for r in refs))
        found: dict[str, str] = {}
        waiting = []
        missing = []
        for ref in wanted:
            cached = self._cache.get(ref)
            if cached is not None:
                self._cache.move_to_end(ref)
                self.stats["cache_hits"] += 1
                found[ref] = cached
            elif (flight := self._fetches.get(ref)) is not None:
                waiting.append((ref, flight))
            else:
                missing.append(ref)
        if missing:
            flights = {ref: self._fetches.start(ref) for ref in missing}
            try:
                texts = await self._fetch_from_store(missing, values)
            except BaseException as exc:
                for ref, flight in flights.items():
                    self._fetches.finish(ref, flight, error=exc)
                raise
            for ref, flight in flights.items():
                self._fetches.finish(ref, flight, value=texts[ref])
            found.update(texts)
        for ref, flight in waiting:
            text = await flight.wait()
            if flight.abandoned:  # the leader was cancelled: fetch it ourselves
                text = (await self.fetch_texts([ref]))[ref]
            found[ref] = text
        return found

    async def _fetch_from_store(
        self, refs: list[str], values: dict[str, Any | LoadFailure] | None
    ) -> dict[str, str]:
        blobs = await self.store.get_many(refs)
        self.stats["fetches"] += 1
        out: dict[str, str] = {}
        verify = self.settings.verify_content
        large: list[tuple[str, bytes, _Header]] = []
        for ref, blob in zip(refs, blobs, strict=True):
            if blob is None:
                raise BlobNotFoundError(
                    f"offloaded value {ref} is not in the store {self.store.url} (expired, "
                    "deleted, or written to a different store)",
                    reference=ref,
                )
            header = _parse_header(ref, blob, self.settings.max_blob_size)
            if header.kind == _KIND_MANIFEST or header.raw_length >= THREAD_MIN_CHARS:
                large.append((ref, blob, header))
            else:
                out[ref] = _decode_single(ref, blob, header, verify)
        if len(large) == 1:
            ref, blob, header = large[0]
            out[ref] = await self._decode_large(ref, blob, header, values)
        elif large:
            # Checksums and hashing release the GIL: several large blobs verify in
            # parallel threads. The first error is raised as itself.
            errors: list[Exception] = []

            async def decode(ref: str, blob: bytes, header: _Header) -> None:
                try:
                    out[ref] = await self._decode_large(ref, blob, header, values)
                except Exception as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                for item in large:
                    tg.start_soon(decode, *item)
            if errors:
                raise errors[0]
        for ref in refs:
            self._cache_put(ref, out[ref])
        return out

    async def _decode_large(
        self, ref: str, blob: bytes, header: _Header, values: dict[str, Any | LoadFailure] | None
    ) -> str:
        if header.kind == _KIND_MANIFEST:
            return await self._fetch_chunked(ref, header)
        verify = self.settings.verify_content
        if values is None:
            return await anyio.to_thread.run_sync(_decode_single, ref, blob, header, verify)
        text, value = await anyio.to_thread.run_sync(
            _decode_and_load, ref, blob, header, verify, self.serializer.loads
        )
        values[ref] = value
        return text

    async def _fetch_chunked(self, ref: str, header: _Header) -> str:
        dec = _Decoder(ref, header)
        count = header.chunk_count
        step = self.CHUNK_FETCH_BATCH
        received = 0
        for start in range(0, count, step):
            # Keys are made one batch at a time: the count comes from the stored manifest.
            batch = [chunk_key(ref, i) for i in range(start, min(start + step, count))]
            chunks = await self.store.get_many(batch)
            for key, chunk in zip(batch, chunks, strict=True):
                if chunk is None:
                    raise BlobCorruptedError(
                        f"blob {ref} is missing its chunk {key.rsplit(':', 1)[1]} "
                        f"of {header.chunk_count}",
                        reference=ref,
                    )
                received += len(chunk)
                if received > header.stored_length:
                    raise BlobCorruptedError(
                        f"blob {ref} chunks hold more than the {header.stored_length} bytes "
                        "its manifest declares",
                        reference=ref,
                    )
                try:
                    await anyio.to_thread.run_sync(dec.feed, chunk)
                except BlobCorruptedError:
                    raise
                except Exception as exc:
                    raise BlobCorruptedError(
                        f"blob {ref} fails to decompress: {exc}", reference=ref
                    ) from None
        if received != header.stored_length:
            raise BlobCorruptedError(
                f"blob {ref} chunks hold {received} bytes, expected {header.stored_length}",
                reference=ref,
            )
        return await anyio.to_thread.run_sync(dec.finish, self.settings.verify_content)

    def _cache_put(self, ref: str, text: str) -> None:
        s = self.settings
        if s.local_cache_size <= 0 or len(text) > s.local_cache_bytes // 4:
            return
        old = self._cache.pop(ref, None)
        if old is not None:
            self._cache_bytes -= len(old)
        self._cache[ref] = text
        self._cache_bytes += len(text)
        while len(self._cache) > s.local_cache_size or self._cache_bytes > s.local_cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= len(dropped)

    async def loads(self, text: str) -> Any:
        """Deserialize inline text (off the loop when it is large)."""
        if len(text) < THREAD_MIN_CHARS:
            return self.serializer.loads(text)
        return await anyio.to_thread.run_sync(self.serializer.loads, text)

    async def decode(self, serialized: str) -> Any:
        """Load one serialized argument value: resolve a reference, then deserialize."""
        if serialized.startswith(REFERENCE_PREFIX):
            serialized = (await self.fetch_texts([serialized]))[serialized]
        return await self.loads(serialized)


def _checked(pieces: Iterable[str]) -> Iterator[str]:
    """Pass pieces through, honouring cancellation of the awaiting task between them."""
    for piece in pieces:
        anyio.from_thread.check_cancelled()
        yield piece


def _batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
