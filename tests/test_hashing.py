"""The canonical args_id rule: golden vectors from pynenc 0.4.0 / rustvello 0.9.1."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acall import InvalidKeyError, SerializationError, compute_args_id
from acall.hashing import REFERENCE_PREFIX, content_reference, is_reference, validate_reference

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "pynenc-args-id.json").read_text(encoding="utf-8")
)


def _reference_rule(args: dict[str, str]) -> str:
    """The rule as DESIGN states it, written the slow obvious way."""
    if not args:
        return "no_args"
    h = hashlib.sha256()
    for k in sorted(args):
        h.update(json.dumps(k, ensure_ascii=False).encode("utf-8"))
        h.update(b"=")
        h.update(json.dumps(args[k], ensure_ascii=False).encode("utf-8"))
        h.update(b";")
    return h.hexdigest()


def test_vector_file_is_complete() -> None:
    assert len(VECTORS["args_id"]) == 214
    assert len(VECTORS["end_to_end_json"]["cases"]) > 0


@pytest.mark.parametrize("case", VECTORS["args_id"], ids=lambda c: c["source"])
def test_args_id_vectors(case: dict[str, Any]) -> None:
    assert compute_args_id(case["serialized_arguments"]) == case["args_id"]


def test_empty_arguments_are_no_args() -> None:
    assert compute_args_id({}) == "no_args"


def test_lone_surrogate_is_a_clear_error() -> None:
    with pytest.raises(SerializationError, match="lone surrogate") as info:
        compute_args_id({"a": '"ok"', "b": "\ud800"})
    assert "'b'" in str(info.value)
    with pytest.raises(SerializationError, match="lone surrogate"):
        compute_args_id({"\udfff": "1"})


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"a": 1}, "must be a str"),
        ({"a": b"1"}, "must be a str"),
        ({"a": None}, "must be a str"),
        ({1: "1"}, "names must be str"),
    ],
)
def test_non_str_keys_and_values_are_clear_errors(args: dict[Any, Any], needle: str) -> None:
    with pytest.raises(SerializationError, match=needle):
        compute_args_id(args)


@given(st.dictionaries(st.text(), st.text(), max_size=8))
def test_matches_the_rule_as_written(args: dict[str, str]) -> None:
    try:
        expected = _reference_rule(args)
    except UnicodeEncodeError:
        with pytest.raises(SerializationError):
            compute_args_id(args)
        return
    assert compute_args_id(args) == expected


@given(st.dictionaries(st.text(max_size=5), st.text(max_size=20), min_size=1, max_size=8))
def test_order_independent(args: dict[str, str]) -> None:
    reordered = dict(reversed(list(args.items())))
    with contextlib.suppress(SerializationError):  # surrogates: see the error tests
        assert compute_args_id(args) == compute_args_id(reordered)


_large_text = st.text(
    alphabet=st.sampled_from('ab"\\é😀\n\x00\u2028'), min_size=1, max_size=40
).map(lambda piece: piece * (4200 // len(piece) + 1))


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(st.text(max_size=5), _large_text, min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3),
)
def test_large_values_match_the_rule(large: dict[str, str], small: dict[str, str]) -> None:
    args = {**small, **large}
    assert compute_args_id(args) == _reference_rule(args)


@pytest.mark.parametrize("value", [[1] * 5000, b"x" * 5000])
def test_large_non_str_values_are_clear_errors(value: Any) -> None:
    with pytest.raises(SerializationError, match="must be a str"):
        compute_args_id({"a": value})


def test_content_reference_rule() -> None:
    text = '"héllo"'
    ref = content_reference(text)
    assert ref == REFERENCE_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert is_reference(ref)
    assert validate_reference(ref) == ref


@pytest.mark.parametrize(
    "value",
    [
        REFERENCE_PREFIX,
        REFERENCE_PREFIX + "A" * 64,
        REFERENCE_PREFIX + "0" * 63,
        REFERENCE_PREFIX + "0" * 64 + "\n",
        REFERENCE_PREFIX + "../../etc/passwd",
        REFERENCE_PREFIX + "0" * 64 + "; DROP TABLE x",
        '"' + REFERENCE_PREFIX + "0" * 64 + '"',
    ],
)
def test_references_are_validated_exactly(value: str) -> None:
    assert not is_reference(value)
    with pytest.raises(InvalidKeyError, match="invalid content reference"):
        validate_reference(value)
