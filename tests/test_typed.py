"""Typed arguments: annotated parameters travel as plain JSON and come back typed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any
from uuid import UUID

import attrs
import pytest

from acall import ArgumentTypeError, CallSerializationError
from acall.calls import Call, LazyCall, TaskSpec
from acall.codec import OffloadCodec
from acall.serializers import JsonSerializer
from acall.stores import open_store
from acall.typed import needs_typing


class Shade(enum.Enum):
    DARK = "dark"
    LIGHT = "light"


@dataclasses.dataclass
class Pixel:
    x: int
    y: int
    shade: Shade = Shade.DARK


@attrs.define
class Frame:
    taken: dt.datetime
    pixels: list[Pixel]
    tags: frozenset[str]
    origin: tuple[int, int]


def render(
    frame: Frame,
    day: dt.date,
    uid: UUID,
    price: Decimal,
    path: Path,
    shade: Shade,
    span: dt.timedelta,
    pair: tuple[int, str],
    ids: set[int],
    nested: dict[str, list[tuple[int, Decimal]]],
    optional: Pixel | None = None,
    plain: int = 0,
    untyped: Any = None,
) -> None: ...


VALUES: dict[str, Any] = {
    "frame": Frame(
        dt.datetime(2026, 11, 28, 12, 30, tzinfo=dt.UTC),
        [Pixel(1, 2), Pixel(3, 4, Shade.LIGHT)],
        frozenset({"b", "a", "c"}),
        (5, 6),
    ),
    "day": dt.date(2026, 1, 2),
    "uid": UUID("12345678-1234-5678-1234-567812345678"),
    "price": Decimal("19.99"),
    "path": Path("/data/in.csv"),
    "shade": Shade.LIGHT,
    "span": dt.timedelta(minutes=3),
    "pair": (1, "one"),
    "ids": {3, 1, 2},
    "nested": {"k": [(1, Decimal("0.1"))]},
    "optional": Pixel(9, 9),
    "plain": 7,
    "untyped": [1, "x"],
}


@pytest.fixture
async def codec() -> Any:
    async with open_store("memory://") as store:
        yield OffloadCodec(store)


async def test_round_trip_of_every_supported_type(codec: OffloadCodec) -> None:
    spec = TaskSpec(render)
    call: Call[Any] = Call.from_args(spec, codec, **VALUES)
    serialized = await call.serialize()
    # Plain JSON data that any JSON reader (pynenc included) can load.
    frame_data = json.loads(serialized["frame"])
    assert frame_data["tags"] == ["a", "b", "c"]
    assert frame_data["taken"] == "2026-11-28T12:30:00+00:00"
    assert json.loads(serialized["ids"]) == [1, 2, 3]
    assert json.loads(serialized["price"]) == "19.99"
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, codec, call.to_dto())
    loaded = await lazy.arguments()
    assert loaded == VALUES
    assert type(loaded["pair"]) is tuple
    assert type(loaded["frame"].tags) is frozenset


async def test_untyped_and_native_parameters_keep_pynenc_bytes(codec: OffloadCodec) -> None:
    spec = TaskSpec(render)
    call: Call[Any] = Call.from_args(spec, codec, **VALUES)
    serialized = await call.serialize()
    ser = JsonSerializer()
    assert serialized["plain"] == ser.dumps(7)
    assert serialized["untyped"] == ser.dumps([1, "x"])
    # Enums keep their pynenc envelope even when annotated.
    assert serialized["shade"] == ser.dumps(Shade.LIGHT)


async def test_sets_give_the_same_args_id_whatever_their_order(codec: OffloadCodec) -> None:
    def f(tags: set[str]) -> None: ...

    spec = TaskSpec(f)
    ids = set()
    for order in (["x", "y", "z"], ["z", "y", "x"], ["y", "z", "x"]):
        call: Call[Any] = Call.from_args(spec, codec, set(order))
        await call.serialize()
        ids.add(call.args_id)
    assert len(ids) == 1


async def test_bad_data_names_the_parameter(codec: OffloadCodec) -> None:
    spec = TaskSpec(render)
    call: Call[Any] = Call.from_args(spec, codec, **VALUES)
    await call.serialize()
    dto = call.to_dto()
    args = dict(dto.serialized_arguments)
    args["frame"] = json.dumps(
        {"taken": "not a date", "pixels": [{"x": "one"}], "tags": [], "origin": [1, 2]}
    )
    from acall import CallDTO, CallId, compute_args_id

    bad = CallDTO(CallId(dto.call_id.task_id, compute_args_id(args)), args)
    lazy: LazyCall[Any] = LazyCall.from_dto(spec, codec, bad)
    with pytest.raises(ArgumentTypeError) as info:
        await lazy.arguments()
    text = str(info.value)
    assert "'frame'" in text
    assert "Frame" in text
    assert "test_typed.render" in text
    assert "frame.taken" in text or "taken" in text


async def test_value_that_cannot_be_unstructured_is_a_call_error(codec: OffloadCodec) -> None:
    def f(when: dt.datetime) -> None: ...

    call: Call[Any] = Call.from_args(TaskSpec(f), codec, object())
    with pytest.raises(CallSerializationError) as info:
        await call.serialize()
    assert "'when'" in str(info.value)


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (int, False),
        (str, False),
        (list[int], False),
        (dict[str, list[float]], False),
        (Any, False),
        (int | None, False),
        (Pixel, True),
        (Frame, True),
        (list[Pixel], True),
        (dict[str, tuple[int, int]], True),
        (Pixel | None, True),
        (PurePosixPath, True),
        (tuple[int, ...], True),
        (frozenset[int], True),
        (Shade, True),
    ],
)
def test_needs_typing(annotation: Any, expected: bool) -> None:
    assert needs_typing(annotation) is expected
