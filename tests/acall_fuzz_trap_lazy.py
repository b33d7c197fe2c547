"""Loaded lazily (importlib.util.LazyLoader) by the no-code-execution tests.

The module object sits in ``sys.modules`` before its code has run; touching an
attribute through the module object runs this code. A payload naming it must not.
"""

from __future__ import annotations

from acall_fuzz_events import record

record("executed acall_fuzz_trap_lazy")


class Boom(Exception):
    """Only reachable once the module's code has run."""
