"""DTOs: JSON round trips, versioning and one error type naming the field path."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import subprocess
import sys
import uuid
from typing import Any

import attrs
import cattrs.gen
import pytest
from helpers import record_with_every_field
from hypothesis import given
from hypothesis import strategies as st

from acall import (
    CallDTO,
    CallId,
    DTOCodec,
    DTOValidationError,
    ErrorInfo,
    InvocationRecord,
    InvocationStatus,
    TaskId,
    compute_args_id,
)
from acall.dto import (
    RECORD_HEAD,
    RECORD_VERSION,
    claimed,
    make_call_dto,
    make_converter,
    make_record,
    new_invocation_id,
    submitted,
    succeeded,
)

ARGS = {"x": "1", "name": '"ada"', "blob": "__pynenc__client_data__:" + "ab" * 32}
CALL = CallDTO(CallId(TaskId("app.tasks", "work"), compute_args_id(ARGS)), ARGS)


@pytest.fixture
def codec() -> DTOCodec:
    return DTOCodec()


def _record(**changes: Any) -> InvocationRecord:
    base = InvocationRecord(invocation_id=new_invocation_id(), call=CALL)
    return attrs.evolve(base, **changes)


def _every_field_set() -> InvocationRecord:
    return record_with_every_field(CALL)


def test_record_json_starts_with_the_claimed_members(codec: DTOCodec) -> None:
    """A record's JSON text opens with RECORD_HEAD, in order (a Redis script rewrites
    them there), then every other field; it reads back as the same record."""
    for record in (_record(), _every_field_set()):
        text = codec.to_json(record)
        members = list(json.loads(text))
        assert members[: len(RECORD_HEAD)] == list(RECORD_HEAD)
        assert sorted(members) == sorted(f.name for f in attrs.fields(InvocationRecord))
        assert text.startswith('{"status":"')
    # The hand-written hook gives what cattrs' generated one would, members reordered.
    generated = cattrs.gen.make_dict_unstructure_fn(InvocationRecord, make_converter())
    for record in (_record(), _every_field_set()):
        assert codec.to_dict(record) == generated(record)
    plain = _record(status=InvocationStatus.RUNNING, attempt=3, worker_id="w")
    assert codec.from_json(codec.to_json(plain), InvocationRecord) == plain
    assert set(RECORD_HEAD) == {"status", "attempt", "worker_id", "updated_at"}


def test_json_by_orjson_reads_and_writes_what_the_stdlib_would(codec: DTOCodec) -> None:
    """Records are written and read with orjson, falling back to the stdlib where
    orjson refuses or would read differently: the documents and values are the same."""
    plain = _record(status=InvocationStatus.SUCCESS, attempt=2, result='"r"', worker_id="w")
    text = codec.to_json(plain)
    assert json.loads(text) == codec.to_dict(plain)
    assert text == json.dumps(codec.to_dict(plain), separators=(",", ":"), ensure_ascii=False)
    # orjson refuses a lone surrogate: the stdlib writes it, and reading refuses it, as
    # before, naming the field.
    text = codec.to_json(_record(error=ErrorInfo("E", "half \ud800 a pair")))
    with pytest.raises(DTOValidationError, match=r"error\.message"):
        codec.from_json(text, InvocationRecord)
    odd_cases = [
        # orjson refuses integers beyond 64 bits, and would read them back as floats.
        _record(attempt=2**70, max_retries=-(2**64)),
        _record(attempt=2**64 - 1, max_retries=-(2**63)),
        _record(worker_id="é € \U0001f600", queue="q"),
    ]
    for record in odd_cases:
        text = codec.to_json(record)
        assert json.loads(text) == codec.to_dict(record)
        assert codec.from_json(text, InvocationRecord) == record
        assert codec.from_json(text.encode("utf-8"), InvocationRecord) == record
    # NaN and infinities are written as the stdlib writes them (orjson would write null)
    # and refused when read, naming the field.
    for field, value in (("timeout", math.nan), ("not_before", math.inf)):
        text = codec.to_json(_record(**{field: value}))
        assert f'"{field}":null' not in text
        with pytest.raises(DTOValidationError, match=field):
            codec.from_json(text, InvocationRecord)
    # What only the stdlib reads is still read, and checked, the same way.
    doc = json.loads(codec.to_json(plain))
    doc["attempt"] = 1.5e19
    with pytest.raises(DTOValidationError, match="attempt"):
        codec.from_json(json.dumps(doc), InvocationRecord)
    doc["attempt"] = 10**25
    assert codec.from_json(json.dumps(doc), InvocationRecord).attempt == 10**25


def test_call_keys_read_with_a_known_task_are_still_checked(codec: DTOCodec) -> None:
    """Reading call keys parses each task key once; a bad args_id, or a bad task key,
    is still rejected with the reason, whatever was read before."""
    good = json.loads(codec.to_json(_record()))
    assert codec.from_dict(good, InvocationRecord).call_id == CALL.call_id  # task now known
    for bad_key in (
        "app.tasks.work:" + "AB" * 32,
        "app.tasks.work:",
        "app.tasks.work",
        "apptasks:" + "ab" * 32,
    ):
        doc = {**good, "call": {**good["call"], "call_id": bad_key}}
        with pytest.raises(DTOValidationError, match="call"):
            codec.from_dict(doc, InvocationRecord)


def test_state_changes_equal_evolve() -> None:
    """The fast constructors of the hot path keep every other field, as evolve does."""
    record = _every_field_set()
    assert claimed(record, "w-new", 400.0) == attrs.evolve(
        record,
        status=InvocationStatus.RUNNING,
        attempt=3,
        worker_id="w-new",
        updated_at=400.0,
    )
    assert succeeded(record, '"done"', 500.0) == attrs.evolve(
        record,
        status=InvocationStatus.SUCCESS,
        result='"done"',
        error=None,
        updated_at=500.0,
    )


def test_submitted_equals_the_keyword_constructor() -> None:
    made = submitted("id-1", CALL, "q1", 4, 100.0, 300.0, 5.0, "key")
    assert made == InvocationRecord(
        invocation_id="id-1",
        call=CALL,
        queue="q1",
        max_retries=4,
        created_at=100.0,
        updated_at=100.0,
        not_before=300.0,
        timeout=5.0,
        dedup_key="key",
    )
    assert type(made) is InvocationRecord


def test_make_record_equals_the_class_field_by_field() -> None:
    values = attrs.astuple(_every_field_set(), recurse=False)
    made = make_record(*values)
    assert type(made) is InvocationRecord
    assert attrs.astuple(made, recurse=False) == values
    assert made == InvocationRecord(*values)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.status = InvocationStatus.FAILED  # type: ignore[misc]


def test_call_dto_json_shape(codec: DTOCodec) -> None:
    assert codec.to_dict(CALL) == {
        "call_id": f"app.tasks.work:{CALL.call_id.args_id}",
        "serialized_arguments": ARGS,
    }
    assert codec.from_json(codec.to_json(CALL), CallDTO) == CALL


def test_invocation_record_round_trip(codec: DTOCodec) -> None:
    rec = _record(
        status=InvocationStatus.FAILED,
        attempt=3,
        max_retries=5,
        not_before=1.5,
        timeout=2.0,
        worker_id="w1",
        dedup_key="k",
        error=ErrorInfo("ValueError", "bad", '{"x": 1}', "Traceback..."),
        result='"ok"',
    )
    text = codec.to_json(rec)
    assert json.loads(text)["v"] == RECORD_VERSION
    assert codec.from_json(text, InvocationRecord) == rec
    assert codec.from_json(text.encode(), InvocationRecord) == rec


def test_unknown_fields_are_ignored_for_forward_compatibility(codec: DTOCodec) -> None:
    data = codec.to_dict(_record())
    data["added_by_a_later_version"] = {"anything": 1}
    assert codec.from_dict(data, InvocationRecord).invocation_id == data["invocation_id"]


def test_converters_are_independent() -> None:
    a, b = make_converter(), make_converter()
    assert a is not b
    b.register_unstructure_hook(TaskId, lambda t: "changed")
    assert a.unstructure(TaskId("m", "f")) == "m.f"


def test_status_finality() -> None:
    assert {s for s in InvocationStatus if s.is_final} == {
        InvocationStatus.SUCCESS,
        InvocationStatus.FAILED,
    }
    assert InvocationStatus("failed").is_final
    assert not InvocationStatus("running").is_final


def test_invocation_ids_are_uuid4_hex_and_unique_across_refills() -> None:
    ids = [new_invocation_id() for _ in range(3_000)]  # several batches made ahead
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(hex=value)
        assert (parsed.hex, parsed.version, parsed.variant) == (value, 4, uuid.RFC_4122)


def test_invocation_ids_are_unique_across_threads() -> None:
    def take() -> list[str]:
        return [new_invocation_id() for _ in range(5_000)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = [i for chunk in pool.map(lambda _: take(), range(8)) for i in chunk]
    assert len(set(ids)) == len(ids) == 40_000


_FORK_PROGRAM = r"""
import os, warnings
warnings.simplefilter("error")  # a fork in a threaded process would warn: none here
from acall import dto
while not dto._ids_ahead:  # the parent holds ids made ahead when it forks
    dto.new_invocation_id()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.write(write, "".join(dto.new_invocation_id() for _ in range(10)).encode())
    finally:
        os._exit(0)
os.close(write)
with os.fdopen(read) as pipe:
    text = pipe.read()
assert os.waitpid(pid, 0)[1] == 0
child = {text[i : i + 32] for i in range(0, len(text), 32)}
parent = {dto.new_invocation_id() for _ in range(10)}
assert len(child) == 10, text
assert not child & parent, "the child handed out the parent's ids"
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_reuse_the_parents_ids_made_ahead() -> None:
    # In a fresh interpreter: forking this test process, which runs threads, is unsafe.
    done = subprocess.run(
        [sys.executable, "-c", _FORK_PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _good() -> dict[str, Any]:
    return DTOCodec().to_dict(_record())


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = _good()
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()

# (document, field path that the error must name)
BAD_RECORDS: list[tuple[Any, str]] = [
    (_with("v", _DELETE), "v"),
    (_with("v", "1"), "v"),
    (_with("v", 0), "v"),
    (_with("v", RECORD_VERSION + 1), "v"),
    (_with("invocation_id", _DELETE), "invocation_id"),
    (_with("invocation_id", 17), "invocation_id"),
    (_with("call", _DELETE), "call"),
    (_with("call", "m.f:no_args"), "call"),
    (_with("call.call_id", _DELETE), "call.call_id"),
    (_with("call.call_id", "no-colon"), "call.call_id"),
    (_with("call.call_id", "nodot:no_args"), "call.call_id"),
    (_with("call.call_id", "m.f:" + "Z" * 64), "call.call_id"),
    (_with("call.call_id", "m.f:" + "0" * 64), "call.call_id"),  # wrong args_id for the args
    (_with("call.call_id", 5), "call.call_id"),
    (_with("call.serialized_arguments", ["x"]), "call.serialized_arguments"),
    (_with("call.serialized_arguments", {"x": 1}), "call.serialized_arguments"),
    (_with("call.serialized_arguments", {"x": "\ud800"}), "call.serialized_arguments"),
    (_with("status", "exploded"), "status"),
    (_with("status", 1), "status"),
    (_with("attempt", "3"), "attempt"),
    (_with("attempt", True), "attempt"),
    (_with("attempt", 1.5), "attempt"),
    (_with("created_at", "yesterday"), "created_at"),
    (_with("not_before", []), "not_before"),
    (_with("error", {"type_name": "X"}), "error.message"),
    (_with("error", {"type_name": 1, "message": "m"}), "error.type_name"),
    (_with("result", 42), "result"),
    (_with("queue", None), "queue"),
]


@pytest.mark.parametrize(("doc", "path"), BAD_RECORDS)
def test_bad_records_name_the_field(codec: DTOCodec, doc: Any, path: str) -> None:
    with pytest.raises(DTOValidationError) as info:
        codec.from_dict(doc, InvocationRecord)
    paths = [p for p, _ in info.value.errors]
    assert path in paths, info.value.errors
    assert path in str(info.value)


def test_several_bad_fields_are_all_reported(codec: DTOCodec) -> None:
    doc = _good()
    doc["attempt"] = "x"
    doc["queue"] = 3
    doc["call"]["call_id"] = "broken"
    with pytest.raises(DTOValidationError) as info:
        codec.from_dict(doc, InvocationRecord)
    assert {p for p, _ in info.value.errors} >= {"attempt", "queue", "call.call_id"}


@pytest.mark.parametrize("text", ["", "nope", "[]", "null", "42", '"str"', "{", '{"call_id": 1}'])
def test_bad_json_text(codec: DTOCodec, text: str) -> None:
    with pytest.raises(DTOValidationError):
        codec.from_json(text, CallDTO)
    with pytest.raises(DTOValidationError):
        codec.from_json(text, InvocationRecord)


def test_args_id_check_can_be_disabled() -> None:
    doc = DTOCodec().to_dict(CALL)
    doc["call_id"] = "app.tasks.work:" + "0" * 64
    with pytest.raises(DTOValidationError):
        DTOCodec().from_dict(doc, CallDTO)
    assert DTOCodec(verify_args_id=False).from_dict(doc, CallDTO).call_id.args_id == "0" * 64


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
        max_leaves=20,
    )
)
def test_any_json_either_decodes_or_raises_dto_error(doc: Any) -> None:
    codec = DTOCodec()
    for cls in (CallDTO, InvocationRecord):
        with contextlib.suppress(DTOValidationError):
            codec.from_dict(doc, cls)


# -- the quick path for records: same result as the converter, or none ----------------

_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.sampled_from([2**1023, -(2**1024), 10**400, 1.5, float("nan"), float("inf"), -0.0]),
    st.text(max_size=6),
    st.sampled_from(["pending", "running", "success", "failed", "retrying", "\ud800", "Success"]),
    st.lists(st.integers(), max_size=2),
    st.fixed_dictionaries({"type_name": st.text(max_size=4), "message": st.text(max_size=4)}),
    st.dictionaries(st.sampled_from(["type_name", "message", "serialized", "x"]), st.none()),
)


@st.composite
def _record_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Documents of valid records, then some members replaced, removed or added."""
    status = draw(st.sampled_from(list(InvocationStatus)))
    error = draw(
        st.none()
        | st.builds(ErrorInfo, st.text(max_size=5), st.text(max_size=5), st.none() | st.text())
    )
    record = _record(
        status=status,
        attempt=draw(st.integers(0, 3)),
        error=error,
        result=draw(st.none() | st.text(max_size=5)),
        not_before=draw(st.none() | st.floats(0, 1e10)),
        worker_id=draw(st.none() | st.text(max_size=5)),
    )
    doc = make_converter().unstructure(record)
    assert isinstance(doc, dict)
    for name in draw(st.lists(st.sampled_from([*sorted(doc), "extra"]), max_size=3)):
        action = draw(st.sampled_from(["replace", "remove"]))
        if action == "remove" and name not in ("created_at", "updated_at"):
            doc.pop(name, None)  # (a missing time is read as now: not comparable)
        else:
            doc[name] = draw(_FIELD_VALUES)
    if isinstance(doc.get("call"), dict) and draw(st.booleans()):
        doc["call"] = dict(doc["call"])
        doc["call"]["serialized_arguments"] = draw(
            st.dictionaries(st.text(max_size=3), _FIELD_VALUES, max_size=2)
        )
    return doc


@given(_record_documents())
def test_quick_record_gives_the_converters_record_or_leaves_it_to_the_converter(
    doc: dict[str, Any],
) -> None:
    from acall.dto import quick_record

    quick = quick_record(doc)
    try:
        full: InvocationRecord | None = make_converter().structure(doc, InvocationRecord)
    except Exception:
        full = None
    if quick is not None:
        assert full is not None, "the quick path accepted what the converter refuses"
        assert quick == full


def test_quick_record_takes_what_acall_writes(codec: DTOCodec) -> None:
    from acall.dto import quick_record

    record = _record(
        status=InvocationStatus.FAILED,
        error=ErrorInfo("ValueError", "bad é", '{"x": 1}', "Traceback..."),
        dedup_key="app.tasks.work:" + "0" * 64,
        timeout=2.5,
    )
    doc = json.loads(codec.to_json(record))
    assert quick_record(doc) == record  # the quick path is the one taken
    assert codec.from_json(codec.to_json(record), InvocationRecord) == record


def test_new_invocation_ids_are_random_version_4_uuids() -> None:
    ids = [new_invocation_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:2000]:
        parsed = uuid.UUID(hex=text)
        assert parsed.hex == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # Every hex digit shows up in every random position (the fixed ones are 12 and 16).
    for position in (0, 13, 17, 31):
        assert {text[position] for text in ids} == set("0123456789abcdef")
    assert {text[16] for text in ids} == set("89ab")


def test_make_call_dto_equals_the_constructor() -> None:
    arguments = {"a": "1", "b": "__pynenc__client_data__:" + "0" * 64}
    made, built = make_call_dto(CALL.call_id, arguments), CallDTO(CALL.call_id, arguments)
    assert type(made) is CallDTO
    assert made == built
    assert repr(made) == repr(built)
    for field in attrs.fields(CallDTO):
        assert getattr(made, field.name) == getattr(built, field.name)
    # The mapping is copied, as the converter copies it, and the object is frozen.
    arguments["a"] = "2"
    assert made.serialized_arguments["a"] == "1"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.call_id = CALL.call_id  # type: ignore[misc]
