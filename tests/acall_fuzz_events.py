"""Side-effect recorder for the no-code-execution tests (tests/test_fuzz_serializer.py).

The gadget modules append to :data:`EVENTS` whenever code of theirs runs that a payload
must never be able to trigger; the tests assert it stays unchanged.
"""

from __future__ import annotations

__all__ = ["EVENTS", "record"]

EVENTS: list[str] = []


def record(what: str) -> None:
    """Note that *what* ran."""
    EVENTS.append(what)
