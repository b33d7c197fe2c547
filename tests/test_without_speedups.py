"""acall installed without its C extension: every fallback is chosen, with the same output.

A machine without a C compiler installs acall without ``acall._speedups``. This runs a
fresh interpreter in which that module cannot be imported, and checks there what the
extension would otherwise do: args_id vectors, the serializer on large strings and
records, and an offload read back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VECTORS = Path(__file__).parent / "vectors" / "pynenc-args-id.json"

_PROGRAM = r"""
import sys
sys.modules["acall._speedups"] = None  # as if it had never been built

import anyio, json
from acall import compute_args_id, hashing, serializers
from acall.codec import OffloadCodec
from acall.serializers import JsonSerializer
from acall.stores import MemoryStore

assert serializers._escape_range is serializers._stdlib_escape_range
assert serializers._plain is serializers._plain_by_marshal
assert hashing._ARGS_TEXT is None
from acall.brokers.base import Delivery, make_delivery
from acall.dto import CallDTO, InvocationRecord, _new_call_dto, make_record
assert (make_record, make_delivery, _new_call_dto) == (InvocationRecord, Delivery, CallDTO)
from acall.stores import base as store_base
from acall.brokers._common import check_name
assert store_base.is_key is store_base._is_key_by_pattern
assert store_base.is_key("ab-c_d.e:F9") and not store_base.is_key("a b")
assert check_name("abc", "queue name") == "abc"

vectors = json.load(open(sys.argv[1], encoding="utf-8"))
for case in vectors["args_id"]:
    assert compute_args_id(case["serialized_arguments"]) == case["args_id"], case["source"]

ser = JsonSerializer()
text = "plain \"quoted\" \\ \n é € \U0001f600 " * 40_000
assert "".join(ser.iter_dumps(text)) == json.dumps(text)
records = [{"id": i, "s": i * 0.5, "t": ["a", None, True]} for i in range(5_000)]
records.append({float("nan"): "key"})
assert ser.dumps(records) == json.dumps(records)

async def offload():
    codec = OffloadCodec(MemoryStore(), ser)
    ref = await codec.encode(text)
    assert (await codec.fetch_texts([ref]))[ref] == json.dumps(text)

anyio.run(offload)
print("fallbacks ok")
"""


def test_everything_works_without_the_extension() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, str(VECTORS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fallbacks ok"
    # The vectors really were there to check.
    assert len(json.loads(VECTORS.read_text(encoding="utf-8"))["args_id"]) == 214
