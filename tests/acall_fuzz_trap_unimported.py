"""A module no test imports: importing it is the side effect payloads try to cause.

It defines classes of every kind an envelope can name, so a loader that imported
modules named by data would find them valid.
"""

from __future__ import annotations

import enum
from typing import Any

from acall_fuzz_events import record

record("imported acall_fuzz_trap_unimported")


class Boom(Exception):
    """An exception class a payload could name."""


class Kind(enum.Enum):
    """An enum a payload could name."""

    A = "a"


class Box:
    """A JsonSerializable class a payload could name."""

    def to_json(self) -> Any:
        return None

    @classmethod
    def from_json(cls, data: Any) -> Box:
        record("acall_fuzz_trap_unimported.Box.from_json")
        return cls()
