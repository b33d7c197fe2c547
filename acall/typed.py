"""Typed arguments: parameters annotated with rich types are (un)structured with cattrs.

When a task parameter is annotated with a type JSON cannot carry (dataclasses, attrs
classes, ``datetime``, ``date``, ``time``, ``timedelta``, ``UUID``, ``Decimal``,
``Path``, tuples, sets, frozensets, enums, and generics over them), the client
*unstructures* the value to plain JSON data before serializing it, and the worker
*structures* the loaded data back into the annotated type. pynenc can still read those
values (as plain data). Parameters annotated with JSON-native types (or not at all) are
left untouched, so their bytes stay identical to pynenc's.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import datetime as dt
import enum
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import PurePath
from typing import Any, Final
from uuid import UUID

import attrs
import cattrs
from cattrs.errors import BaseValidationError

from acall.errors import ArgumentTypeError

__all__ = ["ParamTypes", "make_argument_converter", "needs_typing"]

_NATIVE: Final = frozenset({str, int, float, bool, type(None), object, typing.Any})
_RICH: Final = (
    dt.datetime,
    dt.date,
    dt.time,
    dt.timedelta,
    UUID,
    Decimal,
    PurePath,
    enum.Enum,
    tuple,
    set,
    frozenset,
)
_COLLECTION_ORIGINS: Final = frozenset(
    {
        list,
        dict,
        typing.Union,
        types.UnionType,
        cabc.Sequence,
        cabc.Mapping,
        cabc.MutableSequence,
        cabc.MutableMapping,
    }
)


def needs_typing(annotation: Any) -> bool:
    """Return whether values annotated with *annotation* need cattrs to travel as JSON."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return needs_typing(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return False
    if origin is not None:
        if isinstance(origin, type) and issubclass(origin, (tuple, set, frozenset)):
            return True
        if origin in _COLLECTION_ORIGINS:
            return any(needs_typing(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return isinstance(origin, type) and issubclass(origin, _RICH)
    if annotation in _NATIVE or annotation in (list, dict):
        return False
    if isinstance(annotation, type):
        return (
            issubclass(annotation, _RICH)
            or attrs.has(annotation)
            or dataclasses.is_dataclass(annotation)
        )
    return False


def _sort_key(item: Any) -> str:
    return json.dumps(item, sort_keys=True, default=str)


def make_argument_converter() -> cattrs.Converter:
    """Build the converter for typed arguments (a fresh one per call).

    Enum members are kept as members, so the JSON serializer writes its pynenc-compatible
    enum envelope. Sets and frozensets become *sorted* lists, so the same set gives the
    same bytes, and the same args_id, in every process (string hashing is randomized per
    process, so set iteration order is not).
    """
    conv = cattrs.Converter()
    for cls in (dt.datetime, dt.date, dt.time):
        conv.register_unstructure_hook(cls, lambda v: v.isoformat())
    conv.register_structure_hook(dt.datetime, lambda v, _: _from_iso(dt.datetime, v))
    conv.register_structure_hook(dt.date, lambda v, _: _from_iso(dt.date, v))
    conv.register_structure_hook(dt.time, lambda v, _: _from_iso(dt.time, v))
    conv.register_unstructure_hook(dt.timedelta, lambda v: v.total_seconds())
    conv.register_structure_hook(dt.timedelta, lambda v, _: dt.timedelta(seconds=_number(v)))
    for cls_ in (UUID, Decimal):
        conv.register_unstructure_hook(cls_, str)
    conv.register_structure_hook(UUID, lambda v, _: UUID(_text(v)))
    conv.register_structure_hook(Decimal, lambda v, _: Decimal(_text(v)))
    conv.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, PurePath), str
    )
    conv.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, PurePath), lambda v, t: t(_text(v))
    )
    conv.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, enum.Enum), lambda v: v
    )
    conv.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, enum.Enum),
        lambda v, t: v if isinstance(v, t) else t(v),
    )

    def unstructure_set(value: Any) -> list[Any]:
        items = [conv.unstructure(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=_sort_key)

    conv.register_unstructure_hook_func(_is_set_type, unstructure_set)
    return conv


def _is_set_type(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and issubclass(origin, (set, frozenset))


def _from_iso(cls: Any, value: Any) -> Any:
    return cls.fromisoformat(_text(value))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


class ParamTypes:
    """The typed parameters of one task function and how to convert them.

    :param func: the task function; annotations that cannot be resolved are ignored
        (the parameter is then untyped).
    """

    def __init__(
        self,
        func: Callable[..., Any],
        converter: cattrs.Converter | None = None,
        *,
        task_key: str = "",
    ) -> None:
        self.converter = converter if converter is not None else make_argument_converter()
        self.task_key = task_key
        try:
            hints = typing.get_type_hints(func, include_extras=True)
        except Exception:
            hints = {}
        try:
            params = inspect.signature(func).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        self.annotations: dict[str, Any] = {
            name: hints[name]
            for name, p in params.items()
            if name in hints
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and needs_typing(hints[name])
        }

    def __bool__(self) -> bool:
        return bool(self.annotations)

    def unstructure(self, name: str, value: Any) -> Any:
        """Turn *value* of a typed parameter into plain data (identity for others)."""
        annotation = self.annotations.get(name)
        if annotation is None:
            return value
        try:
            return self.converter.unstructure(value, unstructure_as=annotation)
        except Exception as exc:
            raise ArgumentTypeError(
                f"task {self.task_key!r}: argument {name!r} cannot be converted from "
                f"{type(value).__qualname__} for its annotation {_type_repr(annotation)}: {exc}"
            ) from exc

    def structure(self, name: str, value: Any) -> Any:
        """Turn loaded data of a typed parameter into its annotated type.

        :raises ArgumentTypeError: naming the task, the parameter and each bad field.
        """
        annotation = self.annotations.get(name)
        if annotation is None:
            return value
        try:
            return self.converter.structure(value, annotation)
        except BaseValidationError as exc:
            detail = "; ".join(cattrs.transform_error(exc, path=name))
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
        raise ArgumentTypeError(
            f"task {self.task_key!r}: argument {name!r} does not fit its annotation "
            f"{_type_repr(annotation)}: {detail}"
        )

    def structure_all(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Structure every typed parameter in *values*."""
        return {k: self.structure(k, v) for k, v in values.items()}


def _type_repr(tp: Any) -> str:
    return tp.__qualname__ if isinstance(tp, type) else repr(tp)
