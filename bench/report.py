"""Turn a ``bench/run --json`` results file into the Markdown table of docs/performance.md.

Usage: ``bench/.venv/bin/python -m bench.report bench/results/full.json``
(prints the table; paste it into docs/performance.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    text = f"{value:,.3g}" if value < 100 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def table(results: dict[str, Any]) -> str:
    """Markdown table of every figure, with the machine and revision under it."""
    lines = [
        "| group | figure | acall | anchor | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fig in results["figures"]:
        anchor = ""
        if fig.get("anchor"):
            anchor = f"{fig['anchor']} {_num(fig.get('anchor_value'), fig['unit'])}"
        ratio = f"{fig['ratio']:.2f}x" if fig.get("ratio") is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[fig.get("passed")]
        lines.append(
            f"| {fig['group']} | {fig['name']} | {fig['subject']} "
            f"{_num(fig['value'], fig['unit'])} | {anchor} | {ratio} | "
            f"{fig.get('target') or 'info'} | {met} |"
        )
    machine = results["machine"]
    facts = ", ".join(f"{k}: {v}" for k, v in machine.items() if not isinstance(v, (dict, list)))
    lines.append("")
    lines.append(f"Machine and revision: {facts}.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Print the table for the results file named in *argv*."""
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(json.loads(Path(argv[0]).read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
