"""Record pynenc 0.4.0's JsonSerializer output for every case in acall_serializer_cases.

Run with the anchors venv (``../shared/anchors/setup.sh`` prints its python):

    $(../shared/anchors/setup.sh | tail -n1) tests/vectors/record_pynenc_serializer.py

Writes ``tests/vectors/pynenc-json-serializer.json``: case name -> serialized text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))

import acall_serializer_cases  # noqa: E402
import pynenc  # noqa: E402
from pynenc.serializer.json_serializer import JsonSerializer  # noqa: E402

out = {
    "generated_with": {"pynenc": pynenc.__version__ if hasattr(pynenc, "__version__") else "0.4.0"},
    "cases": {
        name: JsonSerializer.serialize(value)
        for name, value in acall_serializer_cases.cases().items()
    },
}
(here / "pynenc-json-serializer.json").write_text(
    json.dumps(out, ensure_ascii=False, indent=1) + "\n"
)
print(f"recorded {len(out['cases'])} cases")
