"""The digest of a value's stored bytes: content key, checksum and compressed pieces.

A large value reaches the codec as text pieces, encoded one after the other in a worker
thread. :class:`PieceDigest` takes their UTF-8 bytes in order and produces the SHA-256
content key, the xxh3 checksum of the frame and the pieces to store (compressed when the
settings say so). With ``overlap=True`` it hands batches of a few MiB to a helper thread,
which hashes (and compresses) them while the next pieces are being encoded: hashlib and
zlib release the GIL on large buffers, so on two cores the hashing costs the encoding
thread almost nothing.

Why batches: the helper needs the GIL twice per buffer (to start and to return from
``update``). While the encoding thread runs C code that never releases the GIL, a waiting
thread gets it only after the interpreter's switch interval (5 ms), so one handover per
256 KiB piece would leave the helper far behind. A few handovers per value, and a
``time.sleep(0)`` per piece while a batch is in flight (which lets a waiting helper in at
once), keep the helper level with the encoder.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

import xxhash

__all__ = ["PieceDigest"]

#: Bytes gathered before a batch goes to the helper thread.
OVERLAP_BATCH: Final = 2 << 20

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # Two threads: four arguments encoded at once still find a free helper.
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="acall-digest")
        return _pool


def _forget_pool_in_child() -> None:
    # A forked child has none of the parent's threads; a pool created before the fork
    # would accept work and never run it.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


class PieceDigest:
    """SHA-256, xxh3 and the stored pieces of bytes fed in order.

    :param compressor: a ``zlib``/``zstd`` compress object, or ``None`` to store the
        bytes as they are.
    :param overlap: digest batches in a helper thread while the caller goes on (for a
        worker thread encoding a large value; never on the event loop).
    """

    __slots__ = (
        "_comp",
        "_job",
        "_overlap",
        "_pending",
        "_pending_size",
        "_raw_length",
        "_sha",
        "_stored",
        "_xxh",
    )

    def __init__(self, compressor: Any, *, overlap: bool) -> None:
        self._sha = hashlib.sha256()
        self._xxh = xxhash.xxh3_64()
        self._comp = compressor
        self._overlap = overlap
        self._stored: list[bytes] = []
        self._raw_length = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._job: Future[None] | None = None

    def feed(self, data: bytes) -> None:
        """Add the next bytes."""
        self._pending.append(data)
        self._pending_size += len(data)
        job = self._job
        if not self._overlap:
            return
        if job is not None and not job.done():
            time.sleep(0)  # let the helper take the GIL now, not a switch interval later
        elif self._pending_size >= OVERLAP_BATCH:
            self._hand_over()

    def finish(self) -> tuple[str, int, int, tuple[bytes, ...]]:
        """Return (sha256 hex digest, raw byte length, xxh3 checksum, stored pieces)."""
        if self._job is not None:
            self._job.result()
            self._job = None
        for data in self._pending:
            self._absorb(data)
        self._pending = []
        if self._comp is not None:
            self._stored.append(self._comp.flush())
        return self._sha.hexdigest(), self._raw_length, self._xxh.intdigest(), tuple(self._stored)

    def _hand_over(self) -> None:
        if self._job is not None:
            self._job.result()  # done already; raises what the helper raised
        pending = self._pending
        batch = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_size = 0
        try:
            self._job = _helper_pool().submit(self._absorb, batch)
        except RuntimeError:  # the interpreter is shutting down: no new work for threads
            self._job = None
            self._absorb(batch)

    def _absorb(self, data: bytes) -> None:
        self._raw_length += len(data)
        self._sha.update(data)
        self._xxh.update(data)
        if self._comp is None:
            self._stored.append(data)
        else:
            out = self._comp.compress(data)
            if out:
                self._stored.append(out)
