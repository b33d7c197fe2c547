"""Coverage-guided fuzzing of acall's decoders with atheris (optional, not part of the tests).

Usage (atheris is not an acall dependency; install it into the venv first)::

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/atheris_decoders.py TARGET [libFuzzer options]

TARGET is one of ``dto``, ``serializer``, ``blob``, ``reference``, ``ids``. The seed
corpus of ``tests/corpus/TARGET`` is turned into raw inputs in a working directory
(``$TMPDIR/acall-fuzz/TARGET``, which libFuzzer also grows with new inputs), e.g.::

    .venv/bin/python fuzz/atheris_decoders.py serializer -max_total_time=600

Each input must decode or raise an ``acall.errors.AcallError``; anything else is a crash
that libFuzzer reports and saves as ``crash-*``. Add such inputs to ``tests/corpus`` once
fixed, so the regular test run replays them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import atheris

with atheris.instrument_imports():
    from acall import CallDTO, CallId, DTOCodec, InvocationRecord, JsonSerializer, TaskId
    from acall.codec import OffloadCodec, OffloadSettings
    from acall.errors import AcallError
    from acall.hashing import content_reference, validate_reference
    from acall.stores.memory import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
_CODEC = DTOCodec()
_SERIALIZER = JsonSerializer()
_REF = content_reference('"fuzz"')


def _text(data: bytes) -> str:
    # surrogatepass: lone surrogates reach the decoders too, as JSON escapes can make them.
    return data.decode("utf-8", "surrogatepass") if _is_utf8ish(data) else data.decode("latin-1")


def _is_utf8ish(data: bytes) -> bool:
    try:
        data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def fuzz_dto(data: bytes) -> None:
    for cls in (CallDTO, InvocationRecord):
        try:
            obj = _CODEC.from_json(data, cls)
        except AcallError:
            continue
        text = _CODEC.to_json(obj)
        assert _CODEC.from_json(text.encode("utf-8"), cls) == obj


def fuzz_serializer(data: bytes) -> None:
    with contextlib.suppress(AcallError):
        _SERIALIZER.loads(_text(data))


def fuzz_blob(data: bytes) -> None:
    """Input: a byte N (chunk entries, 0-7), N little-endian u32 chunk lengths, the
    chunks, then the blob stored under the reference itself."""
    count = data[0] % 8 if data else 0
    lengths = [int.from_bytes(data[1 + 4 * i : 5 + 4 * i], "little") for i in range(count)]
    pos = 1 + 4 * count
    entries: dict[str, bytes] = {}
    for i, length in enumerate(lengths):
        entries[f"{_REF}:{i}"] = data[pos : pos + length]
        pos += length
    entries[_REF] = data[pos:]

    async def fetch() -> dict[str, str]:
        store = MemoryStore()
        await store.put_many(entries)
        codec = OffloadCodec(store, settings=OffloadSettings(local_cache_size=0))
        return await codec.fetch_texts([_REF])

    try:
        texts = anyio.run(fetch)
    except AcallError:
        return
    assert content_reference(texts[_REF]) == _REF, "a blob decoded to text of another hash"


def fuzz_reference(data: bytes) -> None:
    value = _text(data)
    with contextlib.suppress(AcallError):
        assert validate_reference(value) is value


def fuzz_ids(data: bytes) -> None:
    value = _text(data)
    for parse in (TaskId.from_key, CallId.from_key):
        try:
            parsed: Any = parse(value)
        except AcallError:
            continue
        assert parsed.key == value


TARGETS: dict[str, Callable[[bytes], None]] = {
    "dto": fuzz_dto,
    "serializer": fuzz_serializer,
    "blob": fuzz_blob,
    "reference": fuzz_reference,
    "ids": fuzz_ids,
}


def _seed_bytes(target: str, path: Path) -> list[bytes]:
    """Raw inputs for *target* from one file of tests/corpus/TARGET."""
    raw = path.read_bytes()
    if target in ("dto", "serializer"):
        return [raw]
    case = json.loads(raw)
    if target == "blob":
        ref = case["reference"]
        entries = {k: base64.b64decode(v) for k, v in case["entries"].items()}
        chunks = [entries[k] for k in sorted(entries) if k != ref][:7]
        head = bytes([len(chunks)]) + b"".join(len(c).to_bytes(4, "little") for c in chunks)
        return [head + b"".join(chunks) + entries.get(ref, b"")]
    value = case.get("value")
    return [value.encode("utf-8", "surrogatepass")] if isinstance(value, str) else []


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = sys.argv[1]
    work = Path(tempfile.gettempdir()) / "acall-fuzz" / target
    work.mkdir(parents=True, exist_ok=True)
    seeds = sorted((ROOT / "tests" / "corpus" / target).iterdir())
    for i, path in enumerate(p for p in seeds if p.name != "README.md"):
        for j, seed in enumerate(_seed_bytes(target, path)):
            (work / f"seed-{i}-{j}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(work)], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
