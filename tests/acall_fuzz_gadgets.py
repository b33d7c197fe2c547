"""Gadgets for the no-code-execution tests: objects whose code a payload would like to run.

The fuzz tests import this module, so every name here is reachable by an envelope's
``module``/``qualname``. Each gadget records in :mod:`acall_fuzz_events` when its code
runs; a safe loader refuses every envelope naming one without triggering it.
"""

from __future__ import annotations

import enum
import importlib.util
import os as os_module  # reachable as an attribute of this module
import subprocess as subprocess_module
import sys
import types
from pathlib import Path
from typing import Any

from acall_fuzz_events import record

__all__ = [
    "LAZY_MODULE",
    "CallableInstance",
    "Descriptors",
    "FromJsonOnly",
    "Guarded",
    "MetaFromJson",
    "NotAnException",
    "Palette",
    "WithReduce",
    "install_lazy_module",
]


def __getattr__(name: str) -> Any:
    """Module ``__getattr__``: runs for any name missing from this module."""
    record(f"acall_fuzz_gadgets.__getattr__({name})")
    return ValueError


def side_effect(*args: Any) -> None:
    """A plain function: calling it is what a payload naming it wants."""
    record("acall_fuzz_gadgets.side_effect")


class NotAnException:
    """A non-exception class with a side effect in ``__init__``."""

    def __init__(self, *args: Any) -> None:
        record("NotAnException.__init__")

    def __new__(cls, *args: Any) -> NotAnException:
        record("NotAnException.__new__")
        return super().__new__(cls)


class WithReduce:
    """Pickle hooks: a JSON loader must never reach them."""

    def __reduce__(self) -> Any:
        record("WithReduce.__reduce__")
        return (side_effect, ())

    def __setstate__(self, state: Any) -> None:
        record("WithReduce.__setstate__")

    def __getstate__(self) -> Any:
        record("WithReduce.__getstate__")
        return {}


class Descriptors:
    """Attributes whose lookup runs code (a property, a class-level __getattr__)."""

    @property
    def Boom(self) -> type[Exception]:
        record("Descriptors.Boom property")
        return ValueError

    @classmethod
    def factory(cls, *args: Any) -> Descriptors:
        record("Descriptors.factory")
        return cls()

    def __class_getitem__(cls, item: Any) -> Any:
        record("Descriptors.__class_getitem__")
        return cls


class FromJsonOnly:
    """Half of the JsonSerializable protocol: ``from_json`` without ``to_json``."""

    @classmethod
    def from_json(cls, data: Any) -> FromJsonOnly:
        record("FromJsonOnly.from_json")
        return cls()


class _MetaFromJsonType(type):
    def __getattr__(cls, name: str) -> Any:
        record(f"MetaFromJson metaclass __getattr__({name})")
        return lambda *a: None


class MetaFromJson(metaclass=_MetaFromJsonType):
    """``to_json``/``from_json`` only appear through the metaclass's ``__getattr__``."""


class _TrapMeta(type):
    def __getattribute__(cls, name: str) -> Any:
        if not name.startswith("__") or name in ("__dict__", "__mro__", "__class__"):
            record(f"_TrapMeta.__getattribute__({name})")
        return super().__getattribute__(name)


class Guarded(metaclass=_TrapMeta):
    """A class whose metaclass runs code on attribute access."""

    class Inner(Exception):
        """Legitimately nested: reachable as ``Guarded.Inner``."""


class _Sneaky:
    """An instance that lies about its class and its ``__dict__``."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        record("_Sneaky.__class__ property")
        return type

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        record("_Sneaky.__dict__ property")
        return {"Boom": ValueError, "Kind": Palette, "Box": Descriptors}


class CallableInstance:
    """Instances are callable; the instance below sits at module level."""

    def __call__(self, *args: Any) -> Any:
        record("CallableInstance.__call__")
        return ValueError()


class Palette(enum.Enum):
    """A genuine enum, for envelopes that name its members instead of the class."""

    RED = "red"


sneaky = _Sneaky()
callable_instance = CallableInstance()
error_instance = ValueError("an instance, not a class")

LAZY_MODULE = "acall_fuzz_trap_lazy"


def install_lazy_module() -> types.ModuleType:
    """Put ``acall_fuzz_trap_lazy`` in ``sys.modules`` without running its code."""
    path = Path(__file__).with_name(LAZY_MODULE + ".py")
    spec = importlib.util.spec_from_file_location(LAZY_MODULE, path)
    assert spec is not None
    assert spec.loader is not None
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[LAZY_MODULE] = module
    loader.exec_module(module)
    return module


__all__ += ["callable_instance", "error_instance", "os_module", "sneaky", "subprocess_module"]
