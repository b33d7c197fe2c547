"""The native string escaper (``acall._speedups``) writes exactly what json writes.

Large strings are escaped in pieces by :func:`acall._speedups.escape_ascii`, which runs
with the GIL released. Its output feeds the content key and args_id, so it must be
byte-identical to ``json.encoder.encode_basestring_ascii``: these tests compare the two on
every code point, on random ranges of strings of each internal width, and from several
threads at once; and check that the serializer falls back to the stdlib, with the same
output, where the extension is missing or disagrees.
"""

from __future__ import annotations

import json
import os
import random
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring_ascii
from typing import Any

import pytest

from acall import serializers
from acall.serializers import JsonSerializer

if os.environ.get("CI"):
    # CI installs with a C compiler: the extension must have been built there.
    from acall import _speedups
else:
    _speedups = pytest.importorskip(
        "acall._speedups", reason="acall was installed without its C extension"
    )

escape_ascii = _speedups.escape_ascii


def _expected(text: str, start: int = 0, stop: int | None = None) -> str:
    return str(encode_basestring_ascii(text[start:stop]))[1:-1]


def test_every_code_point() -> None:
    # Controls, DEL, surrogates (lone ones included), the whole BMP and the astral planes.
    for first in range(0, 0x110000, 0x4000):
        text = "".join(map(chr, range(first, min(first + 0x4000, 0x110000))))
        assert escape_ascii(text) == _expected(text), hex(first)


def test_each_code_point_alone() -> None:
    # One character per call: the size pass and the writing pass agree on each.
    for code in [*range(0, 0x200), *range(0xD7F0, 0xE010), 0xFFFF, 0x10000, 0x10FFFF]:
        assert escape_ascii(chr(code)) == _expected(chr(code)), hex(code)


def _text(rng: random.Random, width: int, n: int) -> str:
    alphabet = {
        1: 'ab "\\\n\t\x00\x1f\x7f\xe9\xff',
        2: 'ab "\\\n\x01\x7f\xe9\u20ac\ud800\udfff\uffff',
        4: 'ab "\\\n\x02\u20ac\U0001f600\U0010ffff\ud83d',
    }[width]
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_random_ranges_of_each_width(width: int) -> None:
    rng = random.Random(width)
    # 40,000 characters: above the size from which the GIL is released.
    text = _text(rng, width, 40_000)
    assert escape_ascii(text) == _expected(text)
    for _ in range(300):
        start = rng.randrange(len(text) + 1)
        stop = rng.randrange(start, len(text) + 1)
        assert escape_ascii(text, start, stop) == _expected(text, start, stop)
    assert escape_ascii(text, 7) == _expected(text, 7)


def test_ranges_are_checked() -> None:
    for start, stop in [(-1, 2), (3, 2), (0, 6)]:
        with pytest.raises(ValueError, match="bad range"):
            escape_ascii("hello", start, stop)
    with pytest.raises(TypeError, match="needs a str"):
        escape_ascii(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        escape_ascii()  # type: ignore[call-arg]
    assert escape_ascii("hello", 5, 5) == ""


def test_str_subclasses_are_escaped_by_their_characters() -> None:
    class Tagged(str):
        pass

    assert escape_ascii(Tagged('é"x')) == _expected('é"x')


def test_threads_escaping_at_once_get_their_own_text() -> None:
    rng = random.Random(9)
    texts = [_text(rng, width, 300_000) for width in (1, 2, 4, 2)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(escape_ascii, texts))
    assert results == [_expected(text) for text in texts]


def test_the_serializer_uses_it_for_large_strings() -> None:
    assert serializers._escape_range is escape_ascii
    text = _text(random.Random(3), 4, 3 * JsonSerializer.chunk_chars + 11)
    assert "".join(JsonSerializer().iter_dumps(text)) == json.dumps(text)


def test_the_stdlib_escaper_gives_the_same_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # What runs where the extension was not built.
    text = _text(random.Random(4), 2, 2 * JsonSerializer.chunk_chars + 5)
    native = list(JsonSerializer().iter_dumps(text))
    monkeypatch.setattr(serializers, "_escape_range", serializers._stdlib_escape_range)
    assert list(JsonSerializer().iter_dumps(text)) == native
    assert "".join(native) == json.dumps(text)


def _escaper_with(module: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(sys.modules, "acall._speedups", module)
    return serializers._range_escaper()


def test_a_missing_or_disagreeing_extension_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = types.ModuleType("acall._speedups")
    wrong.escape_ascii = lambda text, start, stop: text[start:stop]  # type: ignore[attr-defined]
    assert _escaper_with(wrong, monkeypatch) is serializers._stdlib_escape_range
    assert _escaper_with(None, monkeypatch) is serializers._stdlib_escape_range
    assert _escaper_with(_speedups, monkeypatch) is escape_ascii
