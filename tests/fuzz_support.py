"""Shared pieces of the fuzz tests (``tests/test_fuzz_*.py``): settings, corpus, counters.

Every fuzz target has the same property: any input either decodes to a valid value or
raises an :class:`~acall.errors.AcallError` whose message says what was wrong. The
helpers here check the error half of it and count the inputs each target was fed.

The Hypothesis profile is picked with ``ACALL_FUZZ_PROFILE`` (``ci``, the default, or
``long``; both registered in ``tests/conftest.py``). ``ACALL_FUZZ_SUMMARY=1`` prints,
after each fuzz module, how many inputs each target decoded.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from acall.errors import AcallError

__all__ = [
    "CORPUS_DIR",
    "COUNTS",
    "FUZZ_MARKS",
    "Deep",
    "assert_useful_error",
    "corpus_files",
    "count",
    "deep_values",
    "expand",
    "fuzz_settings",
    "json_scalars",
    "json_values",
    "nasty_text",
    "outcome",
    "summary",
    "timed",
]

CORPUS_DIR = Path(__file__).parent / "corpus"

PROFILE = os.environ.get("ACALL_FUZZ_PROFILE", "ci")

#: Inputs decoded per target in this process (corpus replays included).
COUNTS: Counter[str] = Counter()

#: One decode must finish well within this (seconds); a hang fails instead of stalling.
DECODE_BUDGET = 5.0

E = TypeVar("E", bound=AcallError)


def fuzz_settings(weight: float = 1.0) -> settings:
    """Settings of one fuzz test: the profile's ``max_examples`` scaled by *weight*.

    *weight* expresses how expensive one example of the test is relative to a cheap
    pure-Python decode, so every test gets a share of the CI time budget.
    """
    try:
        base = settings.get_profile(PROFILE)
    except Exception as exc:  # hypothesis raises InvalidArgument for an unknown name
        raise pytest.UsageError(
            f"ACALL_FUZZ_PROFILE={PROFILE!r} is not a registered profile (use ci or long): {exc}"
        ) from None
    return settings(
        base,
        max_examples=max(10, round(base.max_examples * weight)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


#: Marks of every fuzz module: the summary fixture, and no per-test time limit in the
#: long profile (a long run takes minutes per test; ``timeout`` in pyproject is 300 s).
FUZZ_MARKS = [pytest.mark.usefixtures("fuzz_summary")] + (
    [pytest.mark.timeout(0)] if PROFILE == "long" else []
)


def count(target: str) -> None:
    """Record that *target* decoded one more input."""
    COUNTS[target] += 1


R = TypeVar("R")


def timed(fn: Callable[[], R]) -> R:
    """Run one decode and fail if it took longer than :data:`DECODE_BUDGET`."""
    started = time.perf_counter()
    try:
        return fn()
    finally:
        elapsed = time.perf_counter() - started
        assert elapsed < DECODE_BUDGET, f"one decode took {elapsed:.1f} s"


def outcome(fn: Callable[[], R]) -> tuple[R | None, Exception | None]:
    """Run one decode under :func:`timed`; return ``(value, None)`` or ``(None, error)``."""
    try:
        return timed(fn), None
    except Exception as exc:
        return None, exc


def assert_useful_error(exc: BaseException, kind: type[E], *mentions: str) -> E:
    """Check that a decoder failure is a *kind* error with a message worth reading.

    The message must be non-empty and mention at least one of *mentions* (what was
    being decoded or which field was wrong), case-insensitively.
    """
    if not isinstance(exc, kind):
        raise AssertionError(
            f"leaked {type(exc).__name__} (expected {kind.__name__}): {exc!r:.300}"
        ) from exc
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    if mentions:
        lowered = message.lower()
        assert any(m.lower() in lowered for m in mentions), (
            f"{type(exc).__name__} message names none of {mentions}: {message[:300]!r}"
        )
    return exc


def corpus_files(target: str) -> list[Path]:
    """The seed inputs of *target*: every file under ``tests/corpus/<target>/``."""
    folder = CORPUS_DIR / target
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "README.md")


def corpus_json(target: str) -> Iterator[tuple[Path, Any]]:
    """(path, parsed JSON) for every ``*.json`` file of *target*."""
    for path in corpus_files(target):
        if path.suffix == ".json":
            yield path, json.loads(path.read_text(encoding="utf-8"))


def summary(targets: list[str]) -> str:
    """One line per target: inputs decoded so far in this process."""
    return "\n".join(f"fuzz {t}: {COUNTS[t]} inputs decoded" for t in targets)


@pytest.fixture(scope="module")
def fuzz_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """With ``ACALL_FUZZ_SUMMARY=1``, print the module's input counts after it ran."""
    yield
    if os.environ.get("ACALL_FUZZ_SUMMARY", "") not in ("1", "true", "yes"):
        return
    targets: list[str] = getattr(request.module, "FUZZ_TARGETS", [])
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:  # pragma: no cover - capture plugin disabled (-p no:capture)
        print(summary(targets))
        return
    with capture.global_and_fixture_disabled():
        print(f"\n[{PROFILE} profile] " + summary(targets).replace("\n", "; "))


# ------------------------------------------------------------------ value strategies


class Deep:
    """Stands for a value nested *depth* levels deep, built by :func:`expand`.

    Hypothesis prints a failing example with a recursive pretty-printer that cannot
    print thousands of levels; strategies draw this stand-in instead and the test body
    expands it into the real nested lists (or dicts) before decoding.
    """

    def __init__(self, depth: int, kind: str = "list") -> None:
        self.depth = depth
        self.kind = kind

    def __repr__(self) -> str:
        return f"Deep({self.depth}, {self.kind!r})"

    def build(self) -> Any:
        value: Any = []
        for _ in range(self.depth):
            value = [value] if self.kind == "list" else {"a": value}
        return value


def expand(value: Any) -> Any:
    """Replace every :class:`Deep` inside *value* (dicts and lists) with what it stands for."""
    if isinstance(value, Deep):
        return value.build()
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


#: Deeply nested values (as :class:`Deep` stand-ins), around the recursion limit.
deep_values = st.builds(
    Deep, st.integers(1, 3000) | st.integers(900, 1100), st.sampled_from(["list", "dict"])
)

#: Strings that break naive decoders: lone surrogates, NUL, BOM, RTL marks, escapes.
nasty_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            "",
            "\ud800",
            "a\udfffb",
            "\x00",
            "\ufeff",
            "\u202e",
            "\\",
            '"',
            "\n",
            "__pynenc__",
            "__pynenc__client_data__:",
            "é" * 3,
            "𝔘",
            "..",
            "../../etc/passwd",
            "' OR 1=1 --",
            "*",
        ]
    ),
)

#: JSON scalars including the ones json.loads produces from non-standard tokens.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**300, -(10**4000), 0, -1]),
    st.floats(),  # NaN and infinities included: json.loads reads them
    nasty_text,
)

json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(nasty_text, children, max_size=4)
    ),
    max_leaves=12,
)
