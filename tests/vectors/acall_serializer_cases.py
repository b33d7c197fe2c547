"""Values whose pynenc JsonSerializer output is recorded in pynenc-json-serializer.json.

This module is imported both by the recorder (``record_pynenc_serializer.py``, run with
the anchors venv holding pynenc 0.4.0) and by acall's tests, always under the top-level
name ``acall_serializer_cases`` so that envelope ``module`` fields agree. It must not
import acall or pynenc.
"""

from __future__ import annotations

import math
from enum import Enum, Flag, IntEnum, StrEnum
from typing import Any


class Color(Enum):
    RED = "red"
    GREEN = 2


class Level(IntEnum):
    LOW = 1
    HIGH = 10


class Mode(StrEnum):
    FAST = "fast"
    SAFE = "safe"


class Perm(Flag):
    R = 4
    W = 2


class Outer:
    class Inner(Enum):
        A = 1


class AppError(Exception):
    pass


class DetailedError(ValueError):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class Money:
    def __init__(self, amount: float, currency: str) -> None:
        self.amount = amount
        self.currency = currency

    def to_json(self) -> dict[str, Any]:
        return {"amount": self.amount, "currency": self.currency}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Money:
        return cls(data["amount"], data["currency"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.amount, self.currency) == (
            other.amount,
            other.currency,
        )

    def __hash__(self) -> int:
        return hash((self.amount, self.currency))


def cases() -> dict[str, Any]:
    """Return name -> value. Values are rebuilt fresh on each call."""
    many = {f"k{i}": i for i in range(100)}
    many_enum = {f"k{i}": (Level.HIGH if i == 77 else i) for i in range(100)}
    return {
        "none": None,
        "true": True,
        "false": False,
        "zero": 0,
        "neg_int": -17,
        "big_int": 2**200,
        "float": 3.14159,
        "neg_zero": -0.0,
        "tiny_float": 5e-324,
        "huge_float": 1.7976931348623157e308,
        "nan": math.nan,
        "inf": math.inf,
        "neg_inf": -math.inf,
        "empty_str": "",
        "ascii": "hello world",
        "escapes": 'q"uote\\back\nline\ttab\x00\x1f\x7f',
        "unicode": "ñandú 日本語 \u2028\u2029 😀 𝕏",
        "empty_list": [],
        "empty_dict": {},
        "list": [1, "two", 3.0, None, True],
        "tuple": (1, 2, (3, 4)),
        "nested": {"a": [1, {"b": (2, 3)}], "c": {"d": {"e": []}}},
        "non_str_keys": {3: "int", 2.5: "float", False: "bool", None: "none", "s": "str"},
        "key_order": {"z": 1, "a": 2, "m": 3},
        "enum": Color.RED,
        "enum_int_value": Color.GREEN,
        "int_enum": Level.HIGH,
        "str_enum": Mode.FAST,
        "flag": Perm.R | Perm.W,
        "nested_enum_class": Outer.Inner.A,
        "enums_in_list": [Level.LOW, Mode.SAFE, Color.RED, 5],
        "enums_in_tuple": (Mode.FAST, (Level.HIGH,)),
        "enum_in_dict": {"mode": Mode.SAFE, "level": Level.LOW, "x": [Color.GREEN]},
        "many_keys": many,
        "many_keys_one_enum": many_enum,
        "value_error": ValueError("bad value", 42),
        "key_error": KeyError("missing"),
        "no_args_error": RuntimeError(),
        "custom_error": AppError("it broke", [1, 2]),
        "custom_error_subclass_builtin": DetailedError(7, "detail"),
        "error_in_list": [ZeroDivisionError("division by zero")],
        "money": Money(9.99, "EUR"),
        "money_in_dict": {"price": Money(1.5, "USD"), "qty": 3},
        "long_list": list(range(5000)),
        "long_list_of_dicts": [{"id": i, "name": f"n{i}", "ok": i % 2 == 0} for i in range(3000)],
        "long_string": ("abc\u00e9\u65e5\U0001f600\n" * 60000),
        "dict_with_big_values": {"frame": "x" * 300000, "rows": list(range(70000))},
    }
