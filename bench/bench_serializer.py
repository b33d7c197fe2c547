"""``serializer``: acall's JsonSerializer vs pynenc's on a ~10 MB list of small dicts.

The output of both must be byte-identical (checked before timing). ``json.dumps`` /
``json.loads`` alone are printed as the machine's reference lines: no Python JSON encoder
that writes this text can beat them by much.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any

from acall import JsonSerializer
from bench.harness import (
    BenchError,
    Contender,
    Figure,
    Settings,
    Target,
    call_timed,
    compare,
    group,
    measure,
)

GROUP = "serializer"


class Level(IntEnum):
    """An IntEnum: the C encoder writes it as a number, so both serializers wrap it first."""

    LOW = 1
    HIGH = 2


def _record(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "name": f"user{i}",
        "score": i * 0.5,
        "active": i % 2 == 0,
        "tags": ["a", "b"],
    }


def make_records(size: int = 10_000_000) -> list[dict[str, Any]]:
    """Small dicts whose JSON (``json.dumps`` of the list) is just over ``size`` bytes."""
    records: list[dict[str, Any]] = []
    total = 2  # the brackets
    while total < size:
        record = _record(len(records))
        total += len(json.dumps(record)) + (2 if records else 0)  # ", " between items
        records.append(record)
    return records


def with_enums(records: list[dict[str, Any]], count: int = 5) -> list[dict[str, Any]]:
    """A copy of ``records`` with ``count`` items carrying an IntEnum member (slow path)."""
    out = list(records)
    step = max(1, len(out) // count)
    for k, i in enumerate(range(0, len(out), step)):
        out[i] = {**out[i], "level": Level.HIGH if k % 2 else Level.LOW}
    return out


def _pynenc() -> Any:
    try:
        from pynenc.serializer.json_serializer import JsonSerializer as PynencJsonSerializer
    except ImportError as exc:
        raise BenchError(f"pynenc missing ({exc}); run the benchmarks with bench/run") from exc
    return PynencJsonSerializer


def _run_checked(
    what: str, impls: dict[str, Callable[[Any], object]], arg: Any, *, expected: Any = None
) -> tuple[Any, dict[str, int]]:
    """Call every implementation once; abort unless all results are equal (to ``expected`` too).

    Returns the first implementation's result and how long each call took (the hints that
    spare :func:`~bench.harness.measure` a calibration call).
    """
    runs = {name: call_timed(fn, arg) for name, fn in impls.items()}
    results = {name: result for name, (result, _) in runs.items()}
    if expected is not None:
        results["expected"] = expected
    first_name, first = next(iter(results.items()))
    for name, value in results.items():
        if value != first:
            detail = ""
            if isinstance(value, str) and isinstance(first, str):
                at = next(
                    (i for i, (a, b) in enumerate(zip(first, value, strict=False)) if a != b),
                    min(len(first), len(value)),
                )
                detail = (
                    f" (lengths {len(first)} / {len(value)}; first difference at {at}: "
                    f"{first[at : at + 60]!r} vs {value[at : at + 60]!r})"
                )
            raise BenchError(f"{what}: {name} differs from {first_name}{detail}")
    return first, {name: ns for name, (_, ns) in runs.items()}


@group(GROUP, "JsonSerializer dumps/loads: acall vs pynenc on ~10 MB of small dicts")
def bench_serializer(settings: Settings) -> Iterator[Figure]:
    pynenc = _pynenc()
    acall_ser = JsonSerializer()
    records = make_records()

    def joined(obj: Any) -> str:
        return "".join(acall_ser.iter_dumps(obj))

    def contenders(
        impls: dict[str, Callable[[Any], object]], arg: Any, hints: dict[str, int]
    ) -> list[Contender]:
        return [Contender(name, fn, arg, hints[name]) for name, fn in impls.items()]

    # dumps: acall (one call and chunked) vs pynenc, json.dumps as the machine's reference.
    impls: dict[str, Callable[[Any], object]] = {
        "acall": acall_ser.dumps,
        "pynenc": pynenc.serialize,
        "acall.iter_dumps": joined,
        "json.dumps": json.dumps,
    }
    text, hints = _run_checked("dumps of the records", impls, records)
    assert isinstance(text, str)
    nbytes = len(text.encode("utf-8"))
    name = f"dumps {nbytes / 1e6:.1f} MB dicts"
    timings = measure(contenders(impls, records, hints), settings)
    yield compare(
        GROUP,
        name,
        timings,
        "acall",
        "pynenc",
        metric="mbps",
        nbytes=nbytes,
        target=Target(">=", 5, "acall dumps MB/s >= 5x pynenc's"),
    )
    yield compare(
        GROUP,
        f"{name}, iter_dumps",
        timings,
        "acall.iter_dumps",
        "pynenc",
        metric="mbps",
        nbytes=nbytes,
        subject_label="acall",
    )
    yield compare(GROUP, name, timings, "json.dumps", metric="mbps", nbytes=nbytes)

    # dumps with a few IntEnum members: both serializers take their slow, exact path.
    enum_records = with_enums(records)
    impls = {"acall": acall_ser.dumps, "pynenc": pynenc.serialize}
    enum_text, hints = _run_checked(
        "dumps of the records with IntEnum members", impls, enum_records
    )
    assert isinstance(enum_text, str)
    timings = measure(contenders(impls, enum_records, hints), settings)
    yield compare(
        GROUP,
        "dumps with 5 IntEnum (slow)",
        timings,
        "acall",
        "pynenc",
        metric="mbps",
        nbytes=len(enum_text.encode("utf-8")),
    )
    del enum_records, enum_text

    # loads of the same text, json.loads as the reference.
    impls = {"acall": acall_ser.loads, "pynenc": pynenc.deserialize, "json.loads": json.loads}
    _, hints = _run_checked("loads of the records", impls, text, expected=records)
    timings = measure(contenders(impls, text, hints), settings)
    name = f"loads {nbytes / 1e6:.1f} MB dicts"
    yield compare(GROUP, name, timings, "acall", "pynenc", metric="mbps", nbytes=nbytes)
    yield compare(GROUP, name, timings, "json.loads", metric="mbps", nbytes=nbytes)
