"""Fast constructors for the frozen attrs classes made on every invocation's path.

attrs' frozen ``__init__`` stores each field through ``object.__setattr__`` (the class's
own ``__setattr__`` refuses): about 0.12 us a field, 1.8 us for an invocation record,
which every invocation makes three or four times. The C extension's ``SlotMaker``
stores the values straight into the slots instead, about 0.1 us in all.

:func:`slot_constructor` returns it for a class whose slots are exactly its fields and
which runs nothing at construction (no converters, validators or post-init: the caller
vouches for that), after a probe shows both making equal instances; otherwise, and where
the extension is not built, the class itself, which takes the same positional values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import attrs

__all__ = ["slot_constructor"]

T = TypeVar("T", bound=attrs.AttrsInstance)


def slot_constructor(
    cls: type[T],
    probe: Sequence[Any],
    hidden: Mapping[str, Any] | None = None,
    acyclic: tuple[type, ...] | None = None,
) -> Callable[..., T]:
    """``cls(*values)`` (every field, positionally, in declaration order), made fast.

    :param probe: one value per field, each different from its default, used to check
        that the fast constructor and the class make equal instances.
    :param hidden: slots that are not fields, with the value each starts with (attrs'
        ``_attrs_cached_hash`` slot starts as ``None``).
    :param acyclic: untrack the instances that hold nothing but untracked values
        (strings, numbers, ``None``, instances untracked the same way) and instances of
        these types from the cyclic garbage collector: they can be in no cycle, and
        every collection would otherwise walk each of the thousands alive at once. For
        frozen classes only, and types whose instances never lead back (enum members).
    """
    names = tuple(field.name for field in attrs.fields(cls))
    extra = dict(hidden or {})
    slots = set(getattr(cls, "__slots__", ())) - {"__weakref__"}
    if slots != {*names, *extra} or len(probe) != len(names):
        return cls  # another attrs version lays the class out differently
    try:
        from acall._speedups import SlotMaker

        fill = SlotMaker(cls, (*names, *extra), *(() if acyclic is None else (acyclic,)))
    except (ImportError, TypeError, AttributeError):
        return cls
    maker: Callable[..., Any] = fill
    if extra:
        constants = tuple(extra.values())

        def maker(*values: Any) -> Any:
            return fill(*values, *constants)

    made, expected = maker(*probe), cls(*probe)
    if type(made) is not cls or attrs.astuple(made, recurse=False) != tuple(probe):
        return cls  # pragma: no cover - a broken build
    if made != expected:
        return cls  # pragma: no cover - the class changes values at construction
    return cast("Callable[..., T]", maker)
