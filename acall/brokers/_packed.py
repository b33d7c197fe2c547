"""Finished invocation records packed into bytes the garbage collector never sees.

A memory broker keeps finished records for ``record_ttl`` (a week by default). As
attrs instances, each costs the cyclic garbage collector three tracked objects (the
record, its :class:`~acall.dto.CallDTO` and its :class:`~acall.ids.CallId`), and every
full collection walks all of them: with a few hundred thousand kept records, collections
took a large share of a busy process's time. Packed, a record is one ``bytes`` object
(``marshal`` of a flat tuple of strings, numbers and ``None``): not a container, so the
collector ignores it, and a dict holding only such values is not tracked either.
(Tuples alone would not do: the dict holding them is tracked whenever a fresh one is
added, and walking it touches every tuple. ``marshal`` is safe here: the bytes never
leave the process that made them.)

:func:`pack_record` and :meth:`RecordPacker.unpack` are exact inverses (``tests``
compare every field, and the field lists below against the classes', so a new field
cannot be dropped unnoticed).
"""

from __future__ import annotations

import marshal
from itertools import chain
from typing import Final

from acall.dto import ErrorInfo, InvocationRecord, InvocationStatus, make_call_dto, make_record
from acall.ids import TaskId, make_call_id

__all__ = ["PACKED_FIELDS", "RecordPacker"]

#: InvocationRecord's fields, in the order they are packed.
PACKED_FIELDS: Final = (
    "invocation_id",
    "call",
    "queue",
    "status",
    "attempt",
    "max_retries",
    "created_at",
    "updated_at",
    "not_before",
    "timeout",
    "worker_id",
    "dedup_key",
    "error",
    "result",
    "v",
)

# The first byte of a packed record: its status, readable without unpacking (counts).
_STATUS_BYTE: Final = {status: bytes([i]) for i, status in enumerate(InvocationStatus)}
_BY_BYTE: Final = dict(enumerate(InvocationStatus))

#: A packed record: a status byte, then ``marshal`` of the flat tuple (invocation_id,
#: task key, args_id, queue, attempt, max_retries, created_at, updated_at, not_before,
#: timeout, worker_id, dedup_key, error type name (None: no error), message,
#: serialized, traceback, result, v), then the serialized arguments as name, text,
#: name, text...
Packed = bytes
_ARGS_AT: Final = 18

#: marshal format 2: without the back-references of formats 3 and later (which save a
#: flat tuple of mostly distinct strings 10-15% of its size), marshal writes it in about
#: 60% and reads it in 40% of the time. The bytes never leave the process.
_MARSHAL_VERSION: Final = 2


class RecordPacker:
    """Packs records and unpacks them, sharing one :class:`TaskId` per task key."""

    __slots__ = ("_task_ids",)

    def __init__(self) -> None:
        self._task_ids: dict[str, TaskId] = {}

    def pack(self, r: InvocationRecord) -> Packed:
        """*r* as bytes."""
        call_id = r.call.call_id
        task_id = call_id.task_id
        task_key = task_id.key
        if task_key not in self._task_ids:
            self._task_ids[task_key] = task_id
        e = r.error
        return _STATUS_BYTE[r.status] + marshal.dumps(
            (
                r.invocation_id,
                task_key,
                call_id.args_id,
                r.queue,
                r.attempt,
                r.max_retries,
                r.created_at,
                r.updated_at,
                r.not_before,
                r.timeout,
                r.worker_id,
                r.dedup_key,
                *(
                    (None, None, None, None)
                    if e is None
                    else (e.type_name, e.message, e.serialized, e.traceback)
                ),
                r.result,
                r.v,
                *chain.from_iterable(r.call.serialized_arguments.items()),
            ),
            _MARSHAL_VERSION,
        )

    def unpack(self, packed: Packed) -> InvocationRecord:
        """The record :meth:`pack` packed."""
        p = marshal.loads(memoryview(packed)[1:])
        arguments = dict(zip(p[_ARGS_AT::2], p[_ARGS_AT + 1 :: 2], strict=True))
        call = make_call_dto(make_call_id(self._task_ids[p[1]], p[2]), arguments)
        return make_record(
            p[0],
            call,
            p[3],
            _BY_BYTE[packed[0]],
            p[4],
            p[5],
            p[6],
            p[7],
            p[8],
            p[9],
            p[10],
            p[11],
            None if p[12] is None else ErrorInfo(p[12], p[13], p[14], p[15]),
            p[16],
            p[17],
        )

    def call_key(self, packed: Packed) -> str:
        """The call key of a packed record."""
        return self.unpack(packed).call_id.key

    def status(self, packed: Packed) -> InvocationStatus:
        """The status of a packed record."""
        return _BY_BYTE[packed[0]]
