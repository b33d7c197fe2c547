"""TaskId / CallId keys: format, parsing on the last separator, clear errors."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from acall import CallId, InvalidKeyError, TaskId
from acall.ids import NO_ARGS, is_valid_args_id, make_call_id

HEX64 = "0123456789abcdef" * 4


def test_task_key_and_parse_on_last_dot() -> None:
    tid = TaskId("pkg.sub.module", "func")
    assert tid.key == "pkg.sub.module.func"
    assert TaskId.from_key(tid.key) == tid
    assert str(tid) == tid.key


def test_call_key_and_parse_on_last_colon() -> None:
    cid = CallId(TaskId("a:b.c", "f"), HEX64)
    assert cid.key == f"a:b.c.f:{HEX64}"
    assert CallId.from_key(cid.key) == cid
    assert CallId.from_key("m.f:no_args").args_id == NO_ARGS


def test_ids_are_frozen_and_hashable() -> None:
    a = CallId(TaskId("m", "f"), NO_ARGS)
    b = CallId.from_key("m.f:no_args")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.args_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize("key", ["", "nodot", ".func", "module.", "."])
def test_malformed_task_key_names_the_key(key: str) -> None:
    with pytest.raises(InvalidKeyError) as info:
        TaskId.from_key(key)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "m.f",
        "m.f:",
        "m.f:NO_ARGS",
        f"m.f:{HEX64.upper()}",
        f"m.f:{HEX64[:-1]}",
        f"nodot:{HEX64}",
        f":{HEX64}",
    ],
)
def test_malformed_call_key_raises(key: str) -> None:
    with pytest.raises(InvalidKeyError, match="malformed call key"):
        CallId.from_key(key)


def test_non_string_keys_raise_acall_error() -> None:
    with pytest.raises(InvalidKeyError):
        TaskId.from_key(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        CallId.from_key(None)  # type: ignore[arg-type]


def test_is_valid_args_id() -> None:
    assert is_valid_args_id(NO_ARGS)
    assert is_valid_args_id(HEX64)
    assert not is_valid_args_id(HEX64 + "0")
    assert not is_valid_args_id("g" * 64)


_ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)


@given(
    module=st.lists(_ident, min_size=1, max_size=4).map(".".join),
    func=_ident,
    args_id=st.one_of(st.just(NO_ARGS), st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
)
def test_keys_round_trip(module: str, func: str, args_id: str) -> None:
    cid = CallId(TaskId(module, func), args_id)
    assert CallId.from_key(cid.key) == cid
    assert TaskId.from_key(cid.task_id.key) == cid.task_id


def test_make_call_id_equals_the_constructor() -> None:
    task = TaskId("pkg.mod", "func")
    args_id = "a" * 64
    made, built = make_call_id(task, args_id), CallId(task, args_id)
    assert type(made) is CallId
    assert made == built
    assert hash(made) == hash(built)
    assert repr(made) == repr(built)
    for field in attrs.fields(CallId):
        assert getattr(made, field.name) == getattr(built, field.name)
    # Every slot is set (a new field would be missing here), and the object is frozen.
    for slot in CallId.__slots__:
        if slot != "__weakref__":
            getattr(made, slot)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.args_id = "b" * 64  # type: ignore[misc]
