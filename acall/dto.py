"""Data transfer objects: :class:`CallDTO` and :class:`InvocationRecord`, and their codec.

DTOs are what travels: a broker carries invocation records, a result store keeps them.
They are attrs classes turned into plain dicts and JSON by a cattrs converter that
:func:`make_converter` builds fresh (there is no global mutable converter). Reading a
document validates it completely: a malformed one raises
:class:`~acall.errors.DTOValidationError` naming every bad field path.

JSON shapes (``docs/wire-format.md`` is the normative description)::

    CallDTO          {"call_id": "mod.func:<args_id>", "serialized_arguments": {name: str}}
    InvocationRecord {"v": 1, "invocation_id": "<32 hex>", "call": CallDTO, "queue": "default",
                      "status": "pending", "attempt": 0, "max_retries": 0,
                      "created_at": 1.7e9, "updated_at": 1.7e9, "not_before": null,
                      "timeout": null, "worker_id": null, "dedup_key": null,
                      "error": null | {"type_name": str, "message": str,
                                       "serialized": str|null, "traceback": str|null},
                      "result": null | str}
"""

from __future__ import annotations

import collections
import enum
import json
import math
import os
import reprlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeGuard, TypeVar

import attrs
import cattrs
import orjson
from cattrs.errors import BaseValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn

from acall._slots import slot_constructor
from acall.errors import AcallError, DTOValidationError
from acall.hashing import compute_args_id
from acall.ids import CallId, TaskId, is_valid_args_id, make_call_id

__all__ = [
    "RECORD_VERSION",
    "CallDTO",
    "DTOCodec",
    "ErrorInfo",
    "InvocationRecord",
    "InvocationStatus",
    "claimed",
    "make_call_dto",
    "make_converter",
    "new_invocation_id",
    "succeeded",
    "unclaimed",
]

#: The version written in :attr:`InvocationRecord.v`. Readers accept this and older.
RECORD_VERSION: Final = 1

T = TypeVar("T")


def _frozen_args(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


@attrs.frozen(slots=True)
class CallDTO:
    """A call ready to travel: its identity and its serialized arguments.

    ``serialized_arguments`` maps argument names to inline serialized text or to content
    references of offloaded values.
    """

    call_id: CallId
    serialized_arguments: dict[str, str] = attrs.field(factory=dict, converter=_frozen_args)


_new_call_dto: Final = slot_constructor(
    CallDTO, (CallId(TaskId("probe", "f"), "0" * 64), {"x": "1"}), acyclic=()
)


def make_call_dto(call_id: CallId, serialized_arguments: Mapping[str, str]) -> CallDTO:
    """Same as ``CallDTO(call_id, serialized_arguments)`` (the mapping copied, as the
    converter copies it), faster where the C extension is built (made for every call);
    see :mod:`acall._slots`."""
    return _new_call_dto(call_id, dict(serialized_arguments))


class InvocationStatus(enum.StrEnum):
    """Where an invocation is in its life. Final states: SUCCESS and FAILED."""

    #: True for SUCCESS and FAILED: nothing will change the invocation again. (A plain
    #: attribute of each member, not a property: it is read several times per invocation.)
    is_final: bool

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCESS = "success"
    FAILED = "failed"

    def __init__(self, value: str) -> None:
        self.is_final = value in ("success", "failed")


@attrs.frozen(slots=True)
class ErrorInfo:
    """How a task failed: type, message, and the serialized exception when it could be."""

    type_name: str
    message: str
    serialized: str | None = None
    traceback: str | None = None


# Each hex digit of a random nibble -> the digit with the RFC 4122 variant bits (10xx).
_VARIANT: Final = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


#: Ids made ahead, taken from the left. ``deque.popleft`` is atomic, so threads never
#: share an id; a forked child drops the parent's (it would hand out the same ones).
_ids_ahead: collections.deque[str] = collections.deque()
_IDS_PER_REFILL: Final = 256
os.register_at_fork(after_in_child=_ids_ahead.clear)


def new_invocation_id() -> str:
    """Return a fresh random invocation id: a version-4 UUID as 32 lowercase hex digits.

    The same as ``uuid.uuid4().hex`` (16 bytes from ``os.urandom``), made 256 at a time:
    one system call per 256 ids instead of one per id, for every invocation submitted.
    """
    try:
        return _ids_ahead.popleft()
    except IndexError:
        pass
    raw = os.urandom(16 * _IDS_PER_REFILL).hex()
    variant = _VARIANT
    fresh = [
        f"{raw[i : i + 12]}4{raw[i + 13 : i + 16]}{variant[raw[i + 16]]}{raw[i + 17 : i + 32]}"
        for i in range(32, 32 * _IDS_PER_REFILL, 32)
    ]
    _ids_ahead.extend(fresh)
    h = raw[:32]
    return f"{h[:12]}4{h[13:16]}{variant[h[16]]}{h[17:]}"


@attrs.frozen(slots=True)
class InvocationRecord:
    """One request to run a call, and everything a worker and a client need about it.

    Records are immutable; state changes produce a new record with :func:`attrs.evolve`.

    :ivar v: record format version (:data:`RECORD_VERSION`).
    :ivar invocation_id: unique id of this invocation.
    :ivar call: the call to run.
    :ivar queue: the queue it was submitted to.
    :ivar status: current :class:`InvocationStatus`.
    :ivar attempt: attempts started so far (0 before the first run).
    :ivar max_retries: retries allowed after the first attempt fails.
    :ivar created_at: submission time, seconds since the epoch.
    :ivar updated_at: time of the last status change.
    :ivar not_before: earliest time the next attempt may start (retry backoff).
    :ivar timeout: seconds one attempt may run before it is cancelled.
    :ivar worker_id: the worker that ran (or runs) the latest attempt; ``None`` before
        the first, and once a worker has handed the invocation back (see
        :func:`unclaimed`).
    :ivar dedup_key: concurrency-control key under which this invocation was registered.
    :ivar error: why the latest attempt failed.
    :ivar result: the serialized result (inline text or a content reference).
    """

    invocation_id: str
    call: CallDTO
    queue: str = "default"
    status: InvocationStatus = InvocationStatus.PENDING
    attempt: int = 0
    max_retries: int = 0
    created_at: float = attrs.field(factory=time.time)
    updated_at: float = attrs.field(factory=time.time)
    not_before: float | None = None
    timeout: float | None = None
    worker_id: str | None = None
    dedup_key: str | None = None
    error: ErrorInfo | None = None
    result: str | None = None
    v: int = RECORD_VERSION

    @property
    def call_id(self) -> CallId:
        """Shortcut for ``record.call.call_id``."""
        return self.call.call_id


#: ``InvocationRecord(*values)``, every field given positionally in declaration order;
#: faster where the C extension is built (the record every state change makes).
make_record: Final = slot_constructor(
    InvocationRecord,
    (
        *("id", CallDTO(CallId(TaskId("probe", "f"), "0" * 64), {"x": "1"}), "q"),
        *(InvocationStatus.RETRYING, 2, 3, 1.0, 2.0, 3.0, 4.0, "w", "k"),
        *(ErrorInfo("E", "m", "s", "t"), "r", RECORD_VERSION + 1),
    ),
    # Records are most of what a busy process keeps alive (a worker's and a broker's):
    # out of the collector's way unless one holds something unusual.
    acyclic=(InvocationStatus, ErrorInfo),
)


# The state changes every invocation goes through. They build the new record in one
# positional call of make_record: attrs.evolve looks every field up by name and costs
# more than twice as much as even the attrs constructor, on the path every invocation
# takes. tests/test_dto.py checks each against attrs.evolve (or the keyword
# constructor) with every field set, so a new field cannot be left out unnoticed.


def submitted(
    invocation_id: str,
    call: CallDTO,
    queue: str,
    max_retries: int,
    now: float,
    not_before: float | None,
    timeout: float | None,
    dedup_key: str | None,
) -> InvocationRecord:
    """A new PENDING record, created and updated *now*.

    Same as ``InvocationRecord(invocation_id=..., call=..., queue=...,
    max_retries=..., created_at=now, updated_at=now, not_before=..., timeout=...,
    dedup_key=...)``.
    """
    return make_record(
        invocation_id,
        call,
        queue,
        InvocationStatus.PENDING,
        0,
        max_retries,
        now,
        now,
        not_before,
        timeout,
        None,
        dedup_key,
        None,
        None,
        RECORD_VERSION,
    )


def claimed(record: InvocationRecord, worker_id: str, now: float) -> InvocationRecord:
    """*record* as a worker claims it: RUNNING, one more attempt, run by *worker_id*.

    Same as ``attrs.evolve(record, status=RUNNING, attempt=record.attempt + 1,
    worker_id=worker_id, updated_at=now)``.
    """
    r = record
    return make_record(
        r.invocation_id,
        r.call,
        r.queue,
        InvocationStatus.RUNNING,
        r.attempt + 1,
        r.max_retries,
        r.created_at,
        now,
        r.not_before,
        r.timeout,
        worker_id,
        r.dedup_key,
        r.error,
        r.result,
        r.v,
    )


def unclaimed(record: InvocationRecord, now: float) -> InvocationRecord:
    """*record* as :func:`claimed` left it, handed back without an outcome: waiting again.

    The attempt the claim counted is taken back and no worker holds it; the status is
    RETRYING when an earlier attempt left its error, else PENDING (what a claimed record
    was before its claim).
    """
    waiting = InvocationStatus.PENDING if record.error is None else InvocationStatus.RETRYING
    return attrs.evolve(
        record, status=waiting, attempt=max(0, record.attempt - 1), worker_id=None, updated_at=now
    )


def succeeded(record: InvocationRecord, result: str, now: float) -> InvocationRecord:
    """*record* after its attempt returned: SUCCESS with the serialized *result*.

    Same as ``attrs.evolve(record, status=SUCCESS, result=result, error=None,
    updated_at=now)``.
    """
    r = record
    return make_record(
        r.invocation_id,
        r.call,
        r.queue,
        InvocationStatus.SUCCESS,
        r.attempt,
        r.max_retries,
        r.created_at,
        now,
        r.not_before,
        r.timeout,
        r.worker_id,
        r.dedup_key,
        None,
        result,
        r.v,
    )


def _structure_task_id(value: Any, _: type) -> TaskId:
    return TaskId.from_key(value)


def _structure_call_id(value: Any, _: type) -> CallId:
    return CallId.from_key(value)


def _check_text(value: str) -> str:
    """Return *value* if it can be encoded as UTF-8, else raise ValueError.

    JSON's ``"\\ud800"`` escape decodes to a lone surrogate: a record holding one could be
    read but never written back to a broker or sent to another process (every backend
    encodes records as UTF-8), so it is refused when read.
    """
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"contains a lone surrogate {value[exc.start]!r} at index {exc.start} "
                "(not valid Unicode text)"
            ) from None
    return value


def _structure_str(value: Any, _: type) -> str:
    # cattrs' default str hook would call str() on anything; data must already be text.
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return _check_text(value)


def _structure_status(value: Any, _: type) -> InvocationStatus:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return InvocationStatus(value)


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _structure_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"number out of range ({int(value).bit_length()} bits)") from None
    # json reads NaN and Infinity, but a timestamp or timeout cannot be either, and
    # writing one back would produce JSON that strict parsers reject.
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {number!r}")
    return number


def _structure_arguments(value: Any, _: type) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object of name -> string, got {type(value).__name__}")
    for name, text in value.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise TypeError(f"argument {reprlib.repr(name)}: names and values must be strings")
        try:
            _check_text(name)
            _check_text(text)
        except ValueError as exc:
            raise ValueError(f"argument {reprlib.repr(name)}: {exc}") from None
    return dict(value)


def _is_text(value: Any) -> TypeGuard[str]:
    """Whether *value* is exactly a str of valid Unicode (what json.loads gives)."""
    if type(value) is not str:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(value: Any) -> bool:
    """Whether *value* is exactly an int or float that makes a finite float."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and abs(value) < 2**1023


#: Task ids met in call keys read, by task key (a record is read for every delivery and
#: every result; a process serves a bounded set of tasks, and the cache is cleared if
#: it ever grows large).
_task_ids: dict[str, TaskId] = {}
_TASK_IDS_MAX: Final = 4096


def _call_id(key: str) -> CallId:
    """``CallId.from_key(key)``, parsing each task key once (a cache of whole call keys
    would miss whenever calls differ, as they mostly do)."""
    task_key, _, args_id = key.rpartition(":")
    task_id = _task_ids.get(task_key)
    if task_id is None or not is_valid_args_id(args_id):
        call_id = CallId.from_key(key)  # validates, or raises the error that says why
        if len(_task_ids) >= _TASK_IDS_MAX:
            _task_ids.clear()
        _task_ids[task_key] = call_id.task_id
        return call_id
    return make_call_id(task_id, args_id)


_STATUS_VALUES: Final = {status.value: status for status in InvocationStatus}
_ABSENT: Final = object()

#: ``json.dumps(value, separators=(",", ":"), ensure_ascii=False)`` with one encoder
#: made once: json.dumps makes a new encoder whenever it is given options.
_stdlib_encode_compact: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _encode_compact(value: Any) -> str:
    """Compact JSON text of *value* (plain data), as ``json.dumps`` with ``(",", ":")``
    separators and ``ensure_ascii=False`` writes it, up to the spelling of numbers.

    Records are written and read once or twice per invocation by SQLite and Redis
    brokers, and orjson does each about ten times as fast as the stdlib here. Where
    orjson refuses (a lone surrogate, an integer beyond 64 bits, a key that is not a
    str) the stdlib writes it; orjson would write NaN and infinities as ``null``, so
    callers send values that may hold them to :data:`_stdlib_encode_compact`.
    """
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return _stdlib_encode_compact(value)


#: The members of a record that hold numbers (no nested object holds any).
_NUMBER_MEMBERS: Final = (
    "attempt",
    "max_retries",
    "v",
    "created_at",
    "updated_at",
    "not_before",
    "timeout",
)
# orjson reads an integer beyond 64 bits as a float; json.loads as an int.
_BEYOND_64_BITS: Final = 2.0**63


def _decode_json(text: str | bytes) -> Any:
    """``json.loads(text)``, by orjson where it gives the same (see
    :func:`_encode_compact`). The stdlib reads what orjson refuses (``NaN``, escaped
    lone surrogates, numbers beyond a double's range), and a document where orjson may
    have read an integer beyond 64 bits as a float: both then accept the same
    documents and give the same values."""
    try:
        data = orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):
        return json.loads(text)
    if type(data) is dict:
        get = data.get
        for name in _NUMBER_MEMBERS:
            value = get(name)
            if type(value) is float and abs(value) >= _BEYOND_64_BITS:
                return json.loads(text)
    return data


def _finite_times(record: InvocationRecord) -> bool:
    """Whether every time of *record* is a finite number (orjson writes others as null)."""
    isfinite = math.isfinite
    return (
        isfinite(record.created_at)
        and isfinite(record.updated_at)
        and (record.not_before is None or isfinite(record.not_before))
        and (record.timeout is None or isfinite(record.timeout))
    )


def quick_record(data: dict[str, Any]) -> InvocationRecord | None:
    """Build a record from a well-formed document without the converter, or ``None``.

    Reading records is the hot path of every broker (each claim, each result look-up),
    and the converter with detailed validation costs several times the work itself.
    This accepts only documents whose every field has exactly the expected JSON type
    (what json.loads gives for what acall writes) and returns the record the converter
    would; anything else, from a missing required field to a str subclass, gives
    ``None`` so that the converter checks it and names each problem. Unknown members
    are ignored, as the converter ignores them.
    """
    # Straight-line code and one positional make_record call: this runs for every
    # record read. A field left out takes its default; a field given null where null
    # is not allowed fails its check.
    get = data.get
    call = get("call")
    invocation_id = get("invocation_id")
    if type(call) is not dict or not _is_text(invocation_id):
        return None
    key = call.get("call_id")
    arguments = call.get("serialized_arguments", {})
    if type(key) is not str or type(arguments) is not dict:
        return None
    for name, text in arguments.items():
        if not (_is_text(name) and _is_text(text)):
            return None
    queue = get("queue", "default")
    status = get("status", "pending")
    status = _STATUS_VALUES.get(status) if type(status) is str else None
    attempt = get("attempt", 0)
    max_retries = get("max_retries", 0)
    version = get("v", RECORD_VERSION)  # (its range is DTOCodec._check_version's)
    if (
        not _is_text(queue)
        or status is None
        or type(attempt) is not int
        or type(max_retries) is not int
        or type(version) is not int
    ):
        return None
    worker_id, dedup_key, result = get("worker_id"), get("dedup_key"), get("result")
    for text in (worker_id, dedup_key, result):
        if text is not None and not _is_text(text):
            return None
    created_at = get("created_at", _ABSENT)
    updated_at = get("updated_at", _ABSENT)
    not_before, timeout = get("not_before"), get("timeout")
    for number in (created_at, updated_at):
        if number is not _ABSENT and not _is_number(number):
            return None
    for number in (not_before, timeout):
        if number is not None and not _is_number(number):
            return None
    error = get("error")
    if error is not None:
        if type(error) is not dict:
            return None
        type_name, message = error.get("type_name"), error.get("message")
        serialized, traceback = error.get("serialized"), error.get("traceback")
        if not (_is_text(type_name) and _is_text(message)):
            return None
        if not all(v is None or _is_text(v) for v in (serialized, traceback)):
            return None
        error = ErrorInfo(type_name, message, serialized, traceback)
    try:
        call_id = _call_id(key)
    except AcallError:
        return None
    return make_record(
        invocation_id,
        make_call_dto(call_id, arguments),
        queue,
        status,
        attempt,
        max_retries,
        time.time() if created_at is _ABSENT else float(created_at),
        time.time() if updated_at is _ABSENT else float(updated_at),
        None if not_before is None else float(not_before),
        None if timeout is None else float(timeout),
        worker_id,
        dedup_key,
        error,
        result,
        version,
    )


def _object_structure_factory(cls: type, conv: cattrs.Converter) -> Callable[[Any, type], Any]:
    """Generated attrs hooks, preceded by a check that the document is an object.

    Without it a string where an object belongs fails deep inside with "string indices
    must be integers", blamed on the first field instead of the object itself.
    """
    inner: Callable[[Any, Any], Any] = make_dict_structure_fn(
        cls, conv, _cattrs_forbid_extra_keys=False
    )

    def structure(value: Any, type_: type) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        return inner(value, type_)

    return structure


#: The members a record's JSON text starts with, in this order: the ones a worker's claim
#: changes. A Redis script then reads and rewrites them with one anchored pattern, certain
#: they are top-level members, instead of walking the document (``brokers/redis.py``).
RECORD_HEAD: Final = ("status", "attempt", "worker_id", "updated_at")


def _record_unstructurer(
    unstructure_error: Callable[[ErrorInfo], Any],
) -> Callable[[InvocationRecord], dict[str, Any]]:
    """An InvocationRecord unstructure hook: :data:`RECORD_HEAD` first, then the other
    fields in the class's order (``tests`` check it against cattrs' own output).

    Written out rather than cattrs' generated function reordered: every record written
    to SQLite or Redis comes through here.
    """

    def unstructure(r: InvocationRecord) -> dict[str, Any]:
        error = r.error
        call = r.call
        return {
            "status": r.status.value,
            "attempt": r.attempt,
            "worker_id": r.worker_id,
            "updated_at": r.updated_at,
            "invocation_id": r.invocation_id,
            "call": {
                "call_id": call.call_id.key,
                "serialized_arguments": dict(call.serialized_arguments),
            },
            "queue": r.queue,
            "max_retries": r.max_retries,
            "created_at": r.created_at,
            "not_before": r.not_before,
            "timeout": r.timeout,
            "dedup_key": r.dedup_key,
            "error": None if error is None else unstructure_error(error),
            "result": r.result,
            "v": r.v,
        }

    return unstructure


def make_converter() -> cattrs.Converter:
    """Build a converter for acall's DTOs (a new one each call; nothing global).

    Scalars are checked strictly (no ``str(5)`` or ``int("5")`` coercion): a document
    either has the right types or is rejected.
    """
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    conv.register_unstructure_hook(TaskId, lambda t: t.key)
    conv.register_structure_hook(TaskId, _structure_task_id)
    conv.register_unstructure_hook(CallId, lambda c: c.key)
    conv.register_unstructure_hook(InvocationStatus, lambda s: s.value)
    conv.register_unstructure_hook(
        InvocationRecord, _record_unstructurer(make_dict_unstructure_fn(ErrorInfo, conv))
    )
    conv.register_structure_hook_factory(attrs.has, _object_structure_factory)
    conv.register_structure_hook(CallId, _structure_call_id)
    conv.register_structure_hook(str, _structure_str)
    # Registered explicitly: the str hook above would otherwise accept any string.
    conv.register_structure_hook(InvocationStatus, _structure_status)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook_func(lambda t: t == dict[str, str], _structure_arguments)
    return conv


def _describe_problem(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, ValueError) and isinstance(type_, type) and issubclass(type_, enum.Enum):
        allowed = ", ".join(repr(m.value) for m in type_)
        return f"invalid value ({exc}); expected one of {allowed}"
    return str(exc) or type(exc).__name__


def _flatten_errors(exc: BaseException) -> list[tuple[str, str]]:
    """Turn a cattrs validation error into ``(field path, problem)`` pairs."""
    out: list[tuple[str, str]] = []
    lines = cattrs.transform_error(
        exc,
        path="$",
        format_exception=_describe_problem,
    )
    for line in lines:
        problem, _, path = line.rpartition(" @ ")
        out.append((path.removeprefix("$").lstrip("."), problem or line))
    return out


class DTOCodec:
    """Turns DTOs into plain dicts / JSON and back, validating everything it reads.

    :param verify_args_id: when reading a :class:`CallDTO`, recompute the args_id from
        its serialized arguments and reject a document whose call_id disagrees.
    """

    def __init__(self, *, verify_args_id: bool = True) -> None:
        self.converter = make_converter()
        self.verify_args_id = verify_args_id

    def to_dict(self, obj: Any) -> dict[str, Any]:
        """Unstructure a DTO to a plain dict of JSON types."""
        data = self.converter.unstructure(obj)
        assert isinstance(data, dict)
        return data

    def to_json(self, obj: Any) -> str:
        """Encode a DTO as compact JSON text."""
        data = self.to_dict(obj)
        if type(obj) is InvocationRecord and not _finite_times(obj):
            # Written as json.dumps writes them (NaN, Infinity), and refused when read
            # back, as before: never silently turned into null.
            return _stdlib_encode_compact(data)
        return _encode_compact(data)

    def from_dict(self, data: Any, cls: type[T]) -> T:
        """Structure and validate a plain dict as *cls*.

        :raises DTOValidationError: naming each bad field path.
        """
        what = cls.__name__
        if not isinstance(data, dict):
            raise DTOValidationError(
                what, [("", f"expected a JSON object, got {type(data).__name__}")]
            )
        if cls is InvocationRecord:
            self._check_version(data)
        try:
            obj: Any = quick_record(data) if cls is InvocationRecord else None
            if obj is None:
                obj = self.converter.structure(data, cls)
        except BaseValidationError as exc:
            raise DTOValidationError(what, _flatten_errors(exc)) from None
        except (AcallError, TypeError, ValueError, KeyError) as exc:
            raise DTOValidationError(what, [("", str(exc))]) from None
        if self.verify_args_id:
            dto = obj.call if isinstance(obj, InvocationRecord) else obj
            if isinstance(dto, CallDTO):
                self._check_args_id(dto, "call." if cls is InvocationRecord else "", what)
        result: T = obj
        return result

    def from_json(self, text: str | bytes, cls: type[T]) -> T:
        """Parse and validate JSON text as *cls*.

        :raises DTOValidationError: for text that is not JSON or a malformed document.
        """
        try:
            data = _decode_json(text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise DTOValidationError(cls.__name__, [("", f"not valid JSON: {exc}")]) from None
        return self.from_dict(data, cls)

    @staticmethod
    def _check_version(data: dict[str, Any]) -> None:
        v = data.get("v")
        if v is None:
            raise DTOValidationError("InvocationRecord", [("v", "required field missing")])
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            # reprlib: v may be a deeply nested list, whose repr() raises RecursionError.
            raise DTOValidationError(
                "InvocationRecord", [("v", f"invalid version {reprlib.repr(v)}")]
            )
        if v > RECORD_VERSION:
            raise DTOValidationError(
                "InvocationRecord",
                [
                    (
                        "v",
                        f"version {v} was written by a newer acall (this one reads <= "
                        f"{RECORD_VERSION}); upgrade acall on this process",
                    )
                ],
            )

    @staticmethod
    def _check_args_id(dto: CallDTO, prefix: str, what: str) -> None:
        try:
            expected = compute_args_id(dto.serialized_arguments)
        except AcallError as exc:
            raise DTOValidationError(what, [(f"{prefix}serialized_arguments", str(exc))]) from None
        if expected != dto.call_id.args_id:
            raise DTOValidationError(
                what,
                [
                    (
                        f"{prefix}call_id",
                        f"args_id {dto.call_id.args_id!r} does not match the serialized "
                        f"arguments (their args_id is {expected!r}); the document was altered "
                        "or written with a different rule",
                    )
                ],
            )
