"""``args_id``: the canonical call identity, acall vs pynenc vs rustvello.

All three compute ``sha256`` over ``JSON(key) "=" JSON(value) ";"`` for the sorted keys of
the serialized arguments (a ``dict[str, str]``); the benchmark first checks that the three
digests agree on every input, then times them in the same rounds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from acall import compute_args_id
from bench.harness import (
    BenchError,
    Contender,
    Figure,
    Settings,
    Target,
    compare,
    group,
    measure,
)

GROUP = "args_id"

#: Already-serialized values as a JsonSerializer writes them (ensure_ascii: non-ASCII escaped).
_SMALL_VALUES = (
    "42",
    '"hello"',
    "[1, 2, 3]",
    "true",
    "3.5",
    "null",
    '{"a": 1, "b": [true, false]}',
    '"2024-05-17T12:34:56+00:00"',
    '"caf\\u00e9"',
    "-7",
    '["x", "y"]',
    "1700000000",
    '"user@example.com"',
    "0.001",
    '{"id": 7, "name": "n"}',
    "false",
    '"a \\"quoted\\" word"',
    "[]",
    "{}",
    '"ok"',
)
_SMALL_NAMES = (
    "user_id",
    "greeting",
    "items",
    "active",
    "ratio",
    "parent",
    "options",
    "created_at",
    "city",
    "offset",
    "labels",
    "timestamp",
    "email",
    "tolerance",
    "owner",
    "dry_run",
    "title",
    "history",
    "extra",
    "status",
)

_PARAGRAPH = (
    'Lorem ipsum dolor sit amet, "quoted" consectetur\\adipiscing elit; naïve café, Grüße aus '
    "München, señor, Ελληνικά κείμενα, русский текст, 東京都の天気は晴れ, 서울, ₹100 — "
    "tab\there, newline\nthere, id=12345, ok.\n"
)


def small_args(n: int) -> dict[str, str]:
    """``n`` (<= 20) realistic argument names with already-serialized small values."""
    return dict(zip(_SMALL_NAMES[:n], _SMALL_VALUES[:n], strict=True))


def large_args(size: int = 1_000_000) -> dict[str, str]:
    """One inline value: a JSON string of mixed text (non-ASCII included), ~``size`` UTF-8 bytes."""
    unit = len(json.dumps(_PARAGRAPH, ensure_ascii=False).encode()) - 2
    text = _PARAGRAPH * max(1, size // unit)
    return {"payload": json.dumps(text, ensure_ascii=False)}


def _anchors() -> tuple[Callable[[dict[str, str]], str], Callable[[dict[str, str]], str]]:
    try:
        from pynenc.call import compute_args_id as pynenc_args_id
        from rustvello import compute_args_id as rustvello_args_id
    except ImportError as exc:
        raise BenchError(
            f"anchor packages missing ({exc}); run the benchmarks with bench/run"
        ) from exc
    return pynenc_args_id, rustvello_args_id


def _check_same_digest(args: dict[str, str], impls: dict[str, Callable[[Any], object]]) -> None:
    digests = {name: fn(args) for name, fn in impls.items()}
    if len(set(digests.values())) != 1:
        raise BenchError(
            f"args_id implementations disagree for arguments {sorted(args)!r:.200}: {digests}"
        )


@group(GROUP, "compute_args_id: acall vs pynenc.call vs rustvello (3 / 20 small args, 1 MB value)")
def bench_args_id(settings: Settings) -> Iterator[Figure]:
    pynenc_args_id, rustvello_args_id = _anchors()
    impls: dict[str, Callable[[Any], object]] = {
        "acall": compute_args_id,
        "pynenc": pynenc_args_id,
        "rustvello": rustvello_args_id,
    }

    for n in (3, 20):
        args = small_args(n)
        _check_same_digest(args, impls)
        timings = measure([Contender(name, fn, args) for name, fn in impls.items()], settings)
        name = f"{n} small args"
        yield compare(
            GROUP,
            name,
            timings,
            "acall",
            "pynenc",
            metric="rate",
            target=Target(">=", 5, "acall calls/s >= 5x pynenc's"),
        )
        yield compare(
            GROUP,
            name,
            timings,
            "acall",
            "rustvello",
            metric="time",
            target=Target("<=", 1.5, "acall time per call <= 1.5x rustvello's"),
        )

    args = large_args()
    nbytes = len(args["payload"].encode("utf-8"))
    _check_same_digest(args, impls)
    raw = args["payload"].encode("utf-8")
    contenders = [Contender(name, fn, args) for name, fn in impls.items()]
    contenders.append(Contender("sha256", lambda b: hashlib.sha256(b).hexdigest(), raw))
    timings = measure(contenders, settings)
    name = "1 MB value"
    yield compare(
        GROUP,
        name,
        timings,
        "acall",
        "pynenc",
        metric="mbps",
        nbytes=nbytes,
        target=Target(">=", 1, "acall MB/s >= pynenc's"),
    )
    yield compare(GROUP, name, timings, "acall", "rustvello", metric="mbps", nbytes=nbytes)
    yield compare(
        GROUP,
        "1 MB value, sha256 alone",
        timings,
        "sha256",
        metric="mbps",
        nbytes=nbytes,
        subject_label="hashlib",
    )
