"""hiredis command packing for the broker's connections: the same bytes as redis-py."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import DataError

from acall._redis import packed_by_hiredis

pytest.importorskip("hiredis", reason="hiredis comes with acall's redis extra")

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "0123abcd", 0, "acall:", 604800000, "id", '{"a":"é ü 𝄞","b":[1,2.5]}'),
    ("MGET", *(f"acall:inv:{i}" for i in range(300))),
    ("SCRIPT LOAD", "return 1"),  # a command name of two words
    (b"SCRIPT LOAD", b"return 2"),
    ("SET", "k", b"\x00\xff raw bytes", "PX", 1000),
    ("ZADD", "z", 1.5, "m", 1e300, "n", -0.0, "o"),
    ("SET", "big", "x" * 20_000),  # larger than redis-py's join cut-off
    ("PING",),
]


@pytest.mark.parametrize("base", [Connection, SSLConnection])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_hiredis_packing_gives_redis_py_bytes(
    base: type[Connection], command: tuple[Any, ...]
) -> None:
    packed_class = packed_by_hiredis(base)
    assert packed_class is not base
    assert issubclass(packed_class, base)
    plain = base()
    fast = packed_class()
    assert b"".join(fast.pack_command(*command)) == b"".join(plain.pack_command(*command))


def test_arguments_redis_py_refuses_get_its_error() -> None:
    fast = packed_by_hiredis(Connection)()
    with pytest.raises(DataError, match="bool"):
        fast.pack_command("SET", "k", True)
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", None)  # type: ignore[arg-type]
