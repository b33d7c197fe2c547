"""The fast encoder (ujson) writes exactly what json.dumps writes, or steps aside.

JsonSerializer hands containers of exact builtin types to ujson, which encodes them about
twice as fast as the stdlib. Its output must still be byte-identical to ``json.dumps``
(args_id depends on it), so these tests compare the two on every code point, on a large
sample of floats (random bit patterns included), on every kind of dict key, and on
random nested values, each time checking that the fast path really ran where it should.
"""

from __future__ import annotations

import array
import json
import marshal
import random
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acall import JsonSerializer, SerializationError
from acall.serializers import _FAST_ENCODE, _may_hold_nonfinite, _plain

pytestmark = pytest.mark.skipif(_FAST_ENCODE is None, reason="ujson is missing or differs")


def _fast(obj: Any) -> str | None:
    assert _FAST_ENCODE is not None
    flags = _plain(obj)
    assert flags >= 0, "not a plain value"
    return _FAST_ENCODE(obj, flags)


@pytest.fixture
def ser() -> JsonSerializer:
    """A serializer that takes the fast path for containers of any size."""
    serializer = JsonSerializer()
    serializer.fast_min_items = 0  # type: ignore[misc]
    return serializer


def test_every_code_point() -> None:
    # Surrogates, controls, DEL, astral characters: one string per 4096 code points.
    value = ["".join(map(chr, range(i, min(i + 4096, 0x110000)))) for i in range(0, 0x110000, 4096)]
    assert _fast(value) == json.dumps(value)


def test_del_is_escaped_as_json_escapes_it() -> None:
    value = ["a\x7fb", {"\x7f": "\x7f\x7f"}]
    assert _fast(value) == json.dumps(value) == '["a\\u007fb", {"\\u007f": "\\u007f\\u007f"}]'


def _random_floats(rng: random.Random, n: int) -> list[float]:
    bits = [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(n)]
    scaled = [rng.random() * 10.0 ** rng.randint(-12, 25) for _ in range(n)]
    decimal = [rng.randint(-(10**6), 10**6) / 10 ** rng.randint(0, 12) for _ in range(n)]
    return bits + scaled + decimal


def test_floats_are_written_as_json_writes_them(ser: JsonSerializer) -> None:
    rng = random.Random(20261129)
    values = _random_floats(rng, 40_000)
    small = [v for v in values if v == v and 1e-9 <= abs(v) < 1e-4]
    others = [v for v in values if not (v == v and 1e-9 <= abs(v) < 1e-4)]
    assert small
    assert others
    # Where the fast encoder writes the same text, it must be taken...
    assert _fast(others) == json.dumps(others)
    # ...and where it would write a one-digit exponent, it must step aside.
    assert all(_fast([v]) is None for v in small[:200])
    assert ser.dumps(values) == json.dumps(values)


@pytest.mark.parametrize(
    "key",
    [
        0,
        -(2**70),
        1.5,
        -0.0,
        1e-05,
        1e16,
        float("nan"),
        float("inf"),
        -float("inf"),
        True,
        False,
        None,
        "",
        "nan",
        "inf",
    ],
)
def test_every_kind_of_key(ser: JsonSerializer, key: Any) -> None:
    value = {key: 1, "other": [key]}
    assert ser.dumps(value) == json.dumps(value)


def test_string_text_that_looks_like_a_marker_still_encodes_exactly(ser: JsonSerializer) -> None:
    # Text that trips the checks for one-digit exponents and NaN keys: the exact encoder
    # decides, and the bytes are the same.
    value = {"nan": "1e-5", "x-inf": ["e-1", "inf"], "a": "\x7f"}
    assert _fast(value) is None
    assert ser.dumps(value) == json.dumps(value)


def test_big_records_take_the_fast_path() -> None:
    records = [
        {"id": i, "name": f"user{i}", "score": i * 0.5, "active": i % 2 == 0, "tags": ["a", "b"]}
        for i in range(5000)
    ]
    assert _fast(records) == json.dumps(records)
    assert JsonSerializer().dumps(records) == json.dumps(records)


@pytest.mark.parametrize(
    ("item", "type_name"),
    [
        (b"raw", "bytes"),
        (bytearray(b"raw"), "bytearray"),
        ({1, 2}, "set"),
        (1j, "complex"),
        (array.array("b", [1]), "array.array"),
    ],
)
def test_what_json_refuses_is_still_refused(ser: JsonSerializer, item: Any, type_name: str) -> None:
    # marshal accepts these, so they reach the fast encoder, which must not write them.
    with pytest.raises(SerializationError) as info:
        ser.dumps([1] * 40 + [item])
    assert info.value.type_name == type_name


def test_cycles_and_depth_are_still_reported(ser: JsonSerializer) -> None:
    cyclic: list[Any] = [1] * 40
    cyclic.append(cyclic)
    with pytest.raises(SerializationError, match="contains itself"):
        ser.dumps(cyclic)
    deep: list[Any] = []
    for _ in range(500):
        deep = [deep, 1]
    assert ser.dumps(deep) == json.dumps(deep)
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(SerializationError, match="nested too deeply"):
        ser.dumps(deep)


keys = st.text(max_size=6) | st.integers() | st.floats() | st.booleans() | st.none()
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=6)
        | st.tuples(children, children)
        | st.dictionaries(keys, children, max_size=6)
    ),
    max_leaves=40,
)


@given(values)
def test_property_same_bytes_as_json(value: Any) -> None:
    serializer = JsonSerializer()
    serializer.fast_min_items = 0  # type: ignore[misc]
    expected = json.dumps(value)
    assert serializer.dumps(value) == expected
    fast = _fast(value) if isinstance(value, (list, dict, tuple)) else None
    assert fast is None or fast == expected


def _nonfinite(rng: random.Random) -> float:
    """A NaN (any payload, either sign) or an infinity, from raw bits."""
    sign = rng.getrandbits(1) << 63
    mantissa = rng.choice([0, 1, 1 << 51, rng.getrandbits(52)])
    return float(struct.unpack("<d", struct.pack("<Q", sign | (0x7FF << 52) | mantissa))[0])


def test_nonfinite_floats_are_always_seen_in_marshal_output() -> None:
    # The check that lets the fast path skip searching the text for "nan" / "inf" keys:
    # it may say "maybe" wrongly, never "no" wrongly.
    rng = random.Random(7)
    for _ in range(2000):
        bad = _nonfinite(rng)
        noise: list[Any] = [rng.getrandbits(rng.choice([7, 16, 31])) for _ in range(20)]
        noise += [rng.random() * 1e6, "x" * rng.randint(0, 300)]
        at = rng.randint(0, len(noise))
        shared = rng.random() < 0.5  # the same float object twice: marshal's references
        value = [*noise[:at], {bad: 1}, *noise[at:], *([bad] if shared else [])]
        assert _may_hold_nonfinite(marshal.dumps(value))


def test_nonfinite_keys_among_many_records(ser: JsonSerializer) -> None:
    rng = random.Random(11)
    records = [{"id": i, "score": i * 0.5, "n": -i} for i in range(3000)]
    for _ in range(20):
        value = [*records, {_nonfinite(rng): "key"}]
        assert ser.dumps(value) == json.dumps(value)
    assert not _may_hold_nonfinite(marshal.dumps([{"id": i, "s": i * 0.5} for i in range(3000)]))
