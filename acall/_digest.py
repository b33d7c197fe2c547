"""The digest of a value's stored bytes: content key, checksum and the stored stream.

A large value reaches the codec as text pieces, encoded one after the other in a worker
thread. :class:`PieceDigest` takes their UTF-8 bytes in order and produces the SHA-256
content key, the xxh3 checksum of the bytes and the stored stream (compressed when the
settings say so). With ``overlap=True`` the SHA-256 (and the compression) of each piece
runs in a helper thread while the next piece is being encoded: hashlib and zlib release
the GIL on large buffers, so on two cores the hashing costs the encoding thread almost
nothing.

How the handover stays cheap: a helper thread blocked on its queue needs the GIL to take
the next piece, and while the encoding thread runs C code that never releases the GIL
(the stdlib's escaper, ujson), a waiting thread gets it only after the interpreter's
switch interval (5 ms). So when the encoder finds the previous piece still queued, it
calls ``time.sleep(0)`` after queueing the next, which lets the helper in at once: it
takes a piece, starts hashing it and gives the GIL back, and the helper stays within
about one piece of the encoder. An encoder that releases the GIL itself (acall's native
string escaper) finds the queue empty and skips the call, which would only cost it a
handover per piece. What is left to hash when the last piece is encoded is one piece,
not a batch.

The xxh3 checksum (fast) and the list of stored pieces stay with the encoding thread;
only :meth:`PieceDigest.take` joins the pieces into one ``bytes`` (``bytes.join``
releases the GIL on large results, so the loop is never held up by the copy).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from typing import Any, Final

import xxhash

__all__ = ["PieceDigest"]

#: Bytes gathered before a piece goes to the helper: tiny pieces (a quote, a comma) ride
#: along with the next one instead of costing a handover each.
QUEUE_MIN: Final = 64 * 1024

#: Helper threads. Each digest keeps to one helper (SHA-256 is sequential); two let two
#: values being encoded at once be hashed on two cores.
HELPERS: Final = 2


class _Helper:
    """A daemon thread digesting queued pieces in the order they were queued."""

    def __init__(self, index: int) -> None:
        self.queue: queue.SimpleQueue[tuple[PieceDigest, bytes | None]] = queue.SimpleQueue()
        self.users = 0
        self.thread = threading.Thread(target=self._run, name=f"acall-digest-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        get = self.queue.get
        while True:
            digest, data = get()
            digest._take_queued(data)


_helpers: list[_Helper] = []
_helpers_lock = threading.Lock()


def _attach() -> _Helper:
    """The least busy helper, started on first use; counted as used until :func:`_detach`.

    :raises RuntimeError: when no thread can be started (interpreter shutdown).
    """
    with _helpers_lock:
        if len(_helpers) < HELPERS:
            idle = next((h for h in _helpers if h.users == 0), None)
            helper = idle if idle is not None else _Helper(len(_helpers))
            if idle is None:
                _helpers.append(helper)
        else:
            helper = min(_helpers, key=lambda h: h.users)
        helper.users += 1
        return helper


def _detach(helper: _Helper) -> None:
    with _helpers_lock:
        helper.users -= 1


def _forget_helpers_in_child() -> None:
    # A forked child has none of the parent's threads; a helper started before the fork
    # would take pieces and never digest them.
    global _helpers, _helpers_lock
    _helpers = []
    _helpers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_helpers_in_child)


class PieceDigest:
    """SHA-256, xxh3 and the stored stream of bytes fed in order.

    :param compressor: a ``zlib``/``zstd`` compress object, or ``None`` to store the
        bytes as they are.
    :param overlap: digest pieces in a helper thread while the caller goes on (for a
        worker thread encoding a large value; never on the event loop).
    """

    __slots__ = (
        "_comp",
        "_done",
        "_error",
        "_helper",
        "_pending",
        "_pending_size",
        "_raw_length",
        "_sha",
        "_stored",
        "_taken",
        "_xxh",
    )

    def __init__(self, compressor: Any, *, overlap: bool) -> None:
        self._sha = hashlib.sha256()
        self._xxh = xxhash.xxh3_64()
        self._comp = compressor
        self._stored: list[bytes] = []
        self._raw_length = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._error: BaseException | None = None
        self._taken = False
        self._helper: _Helper | None = None
        # Held while the helper has work of this digest; the helper releases it.
        self._done = threading.Lock()
        if overlap:
            try:
                self._helper = _attach()
            except RuntimeError:  # interpreter shutdown: no new threads, digest here
                self._helper = None
            else:
                self._done.acquire()

    def feed(self, data: bytes) -> None:
        """Add the next bytes."""
        self._raw_length += len(data)
        self._xxh.update(data)
        if self._comp is None:
            self._stored.append(data)
        helper = self._helper
        if helper is None:
            self._digest(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= QUEUE_MIN:
            # The previous piece still queued: the helper is waiting for the GIL, which
            # the encoder held all along. Let it in now, not a switch interval later.
            behind = not helper.queue.empty()
            self._queue_pending(helper)
            if behind:
                time.sleep(0)

    def finish(self) -> tuple[str, int, int, int]:
        """Return (sha256 hex digest, raw byte length, xxh3 checksum, stored length)."""
        helper = self._helper
        if helper is not None:
            self._helper = None
            if self._pending:
                self._queue_pending(helper)
            helper.queue.put((self, None))
            self._done.acquire()  # until the helper has digested every queued piece
            _detach(helper)
            if self._error is not None:
                raise self._error
        if self._comp is not None:
            self._stored.append(self._comp.flush())
        return (
            self._sha.hexdigest(),
            self._raw_length,
            self._xxh.intdigest(),
            sum(map(len, self._stored)),
        )

    def abandon(self) -> None:
        """Give up on a digest that will not be finished (its value failed to encode):
        the helper drops it after what is already queued, and the caller does not wait.
        Does nothing after :meth:`finish`."""
        helper = self._helper
        if helper is not None:
            self._helper = None
            self._pending = []
            helper.queue.put((self, None))
            _detach(helper)

    def take(self, head: bytes = b"") -> bytes:
        """After :meth:`finish`: *head* followed by the stored stream, as one ``bytes``.

        The digest is spent afterwards.
        """
        return b"".join((head, *self.take_pieces()))

    def take_pieces(self) -> tuple[bytes, ...]:
        """After :meth:`finish`: the stored stream in the pieces it was made of (for
        values stored in chunks, which are cut from the pieces without joining them
        first). The digest is spent afterwards."""
        if self._taken:
            raise RuntimeError("PieceDigest.take called twice")
        self._taken = True
        stored = tuple(self._stored)
        self._stored = []
        return stored

    def _queue_pending(self, helper: _Helper) -> None:
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_size = 0
        helper.queue.put((self, data))

    def _take_queued(self, data: bytes | None) -> None:
        """In the helper: digest queued *data*, or (``None``) signal that all is done."""
        if data is None:
            self._done.release()
        elif self._error is None:
            try:
                self._digest(data)
            except BaseException as exc:  # raised again by finish, in the caller
                self._error = exc

    def _digest(self, data: bytes) -> None:
        self._sha.update(data)
        if self._comp is not None:
            out = self._comp.compress(data)
            if out:
                self._stored.append(out)
