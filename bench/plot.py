"""Plot a ``bench/run --json`` results file for docs/performance.md.

Usage: ``bench/.venv/bin/python -m bench.plot bench/results/full.json docs/_static/ratios.png``

One horizontal bar per figure that has a target: acall's ratio to its anchor (or to the
target value), on a log scale, with the target drawn as a tick, so "better than the
target" is always to the right of the tick.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

_TARGET = re.compile(r"ratio\s*(>=|<=)\s*([0-9.]+)x")


def _bars(results: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(label, goodness, target goodness): ratios flipped so that higher is better."""
    bars = []
    for fig in results["figures"]:
        match = _TARGET.search(fig.get("target") or "")
        if match is None or fig.get("ratio") is None:
            continue
        op, target = match.group(1), float(match.group(2))
        ratio = float(fig["ratio"])
        if op == "<=":  # a time or a stall: lower is better, so plot the inverse
            ratio, target = 1 / ratio, 1 / target
        anchor = fig.get("anchor")
        versus = f" (vs {anchor})" if anchor and f"vs {anchor}" not in fig["name"] else ""
        bars.append((f"{fig['group']}: {fig['name']}{versus}", ratio, target))
    return bars


def plot(results: dict[str, Any], out: Path) -> None:
    """Write the ratio chart for *results* to *out* (PNG)."""
    bars = _bars(results)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.4))
    labels = [b[0] for b in bars]
    values = [b[1] for b in bars]
    targets = [b[2] for b in bars]
    colors = ["#2e7d32" if v >= t else "#c62828" for v, t in zip(values, targets, strict=True)]
    ys = range(len(bars))
    ax.barh(ys, values, color=colors)
    ax.scatter(targets, ys, marker="|", s=300, color="black", label="target", zorder=3)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("acall vs anchor or limit (log scale; right is better; green = target met)")
    revision = str(results["machine"].get("acall", "")).split(",")[0]
    ax.set_title(f"acall benchmark ratios — {revision})", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Plot the results file ``argv[0]`` into ``argv[1]``."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[0]).read_text(encoding="utf-8")), Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
