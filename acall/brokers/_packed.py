"""Finished invocation records packed into bytes the garbage collector never sees.

A memory broker keeps finished records for ``record_ttl`` (a week by default). Packed,
a record is one ``bytes`` object (``marshal`` of a tuple of strings, numbers, ``None``
and the arguments' dict): about a third of the memory of the objects it replaces (271
against 764 bytes for a no-op task's record), and nothing for the cyclic garbage
collector to walk. (Records made by the C extension are untracked already; without it,
a record, its :class:`~acall.dto.CallDTO` and its :class:`~acall.ids.CallId` are three
tracked objects that every full collection walks.) ``marshal`` is safe here: the bytes
never leave the process that made them.

:meth:`RecordPacker.pack` and :meth:`RecordPacker.unpack` are exact inverses (``tests``
compare every field, and the field lists below against the classes', so a new field
cannot be dropped unnoticed).
"""

from __future__ import annotations

import marshal
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

#: A packed record: a status byte, then ``marshal`` of the tuple (invocation_id, task
#: key, args_id, queue, attempt, max_retries, created_at, updated_at, not_before,
#: timeout, worker_id, dedup_key, result, v, error (None, or its type name, message,
#: serialized and traceback), serialized arguments (a dict)).
Packed = bytes

#: marshal format 2: without the back-references of formats 3 and later (which save a
#: record of mostly distinct strings 10-15% of its size), marshal writes it in about
#: 60% and reads it in 40% of the time. The bytes never leave the process.
_MARSHAL_VERSION: Final = 2


class RecordPacker:
    """Packs records and unpacks them, sharing one :class:`TaskId` per task key."""

    __slots__ = ("_task_ids",)

    def __init__(self) -> None:
        self._task_ids: dict[str, TaskId] = {}

    def pack(self, r: InvocationRecord) -> Packed:
        """*r* as bytes."""
        call = r.call
        call_id = call.call_id
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
                r.result,
                r.v,
                None if e is None else (e.type_name, e.message, e.serialized, e.traceback),
                # Always a plain dict of strs (CallDTO's converter copies it into one),
                # which marshal writes as it is.
                call.serialized_arguments,
            ),
            _MARSHAL_VERSION,
        )

    def unpack(self, packed: Packed) -> InvocationRecord:
        """The record :meth:`pack` packed."""
        p = marshal.loads(memoryview(packed)[1:])
        call = make_call_dto(make_call_id(self._task_ids[p[1]], p[2]), p[15])
        e = p[14]
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
            None if e is None else ErrorInfo(*e),
            p[12],
            p[13],
        )

    def call_key(self, packed: Packed) -> str:
        """The call key of a packed record (its task key and args_id, nothing more built)."""
        p = marshal.loads(memoryview(packed)[1:])
        return make_call_id(self._task_ids[p[1]], p[2]).key

    def status(self, packed: Packed) -> InvocationStatus:
        """The status of a packed record."""
        return _BY_BYTE[packed[0]]
