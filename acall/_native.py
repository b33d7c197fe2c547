"""The C extension's functions, where it was built and agrees with the Python code.

``acall._speedups`` is optional (built from C when a compiler is present at install
time). Each of its functions replaces Python code with the same results, and is used
only after a probe at import shows it gives them; otherwise the Python code runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["native_function"]


def native_function(
    name: str, agrees: Callable[[Callable[..., Any]], bool]
) -> Callable[..., Any] | None:
    """``acall._speedups.<name>`` if the extension is built and *agrees* (a probe
    comparing it with the Python code it replaces) says yes, else ``None``."""
    try:
        module = importlib.import_module("acall._speedups")
    except ImportError:
        return None
    function: Callable[..., Any] | None = getattr(module, name, None)
    if function is None or not agrees(function):
        return None
    return function
