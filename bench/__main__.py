"""``python -m bench``: run the registered figure groups and print one line per figure.

Exit status: 0 when every figure with a target met it, 1 when a target was missed, 2 when
a benchmark could not run (e.g. the implementations disagree on a result).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench
from bench.harness import (
    BenchError,
    Figure,
    Group,
    Settings,
    format_figure,
    machine_facts,
    registered_groups,
)


def discover() -> list[Group]:
    """Import every ``bench.bench_*`` module (they register their groups) in name order."""
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        if info.name.startswith("bench_"):
            importlib.import_module(f"bench.{info.name}")
    return registered_groups()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark acall side by side with pynenc 0.4.0 and rustvello 0.9.1.",
        epilog="Exit status: 0 all targets met, 1 a target missed, 2 a benchmark failed.",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        default=[],
        help="run only groups whose name contains NAME (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds (smoke run)")
    p.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    p.add_argument("--list", action="store_true", help="list the figure groups and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    groups = discover()
    if args.only:
        groups = [g for g in groups if any(part in g.name for part in args.only)]
        if not groups:
            print(f"no group matches --only {args.only}", file=sys.stderr)
            return 2
    if args.list:
        for g in groups:
            print(f"{g.name:<12} {g.description}")
        return 0

    settings = Settings.quick_run() if args.quick else Settings.full()
    facts = machine_facts()
    print("acall benchmarks" + (" (quick)" if settings.quick else ""))
    for key, value in facts.items():
        print(f"  {key + ':':<18}{value}")
    print(f"  {'method:':<18}{settings.describe()}")
    print(flush=True)

    figures: list[Figure] = []
    errors: list[dict[str, str]] = []
    started = time.perf_counter()
    for g in groups:
        t0 = time.perf_counter()
        try:
            for fig in g.fn(settings):
                figures.append(fig)
                print(format_figure(fig), flush=True)
        except BenchError as exc:
            print(f"\n!!! {g.name}: ABORTED: {exc}\n", file=sys.stderr, flush=True)
            errors.append({"group": g.name, "error": str(exc)})
            break
        except Exception as exc:
            traceback.print_exc()
            print(f"\n!!! {g.name}: FAILED: {exc!r}\n", file=sys.stderr, flush=True)
            errors.append({"group": g.name, "error": repr(exc)})
        print(f"{'':<{10}} ({g.name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    elapsed = time.perf_counter() - started

    targeted = [f for f in figures if f.passed is not None]
    missed = [f for f in targeted if not f.passed]
    print()
    print(
        f"{len(figures)} figures, {len(targeted) - len(missed)}/{len(targeted)} targets met"
        f"{', ' + str(len(errors)) + ' group(s) failed' if errors else ''}; {elapsed:.1f} s"
    )
    for f in missed:
        assert f.target is not None
        assert f.ratio is not None
        print(f"  MISSED {f.group} {f.name}: ratio {f.ratio:.2f}x, target {f.target.description}")

    if args.json is not None:
        doc: dict[str, Any] = {
            "machine": facts,
            "settings": {
                "quick": settings.quick,
                "min_rounds": settings.min_rounds,
                "max_rounds": settings.max_rounds,
                "budget_s": settings.budget_s,
                "min_round_s": settings.min_round_s,
                "warmup_calls": settings.warmup_calls,
                "method": settings.describe(),
            },
            "elapsed_s": elapsed,
            "figures": [f.as_dict() for f in figures],
            "errors": errors,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")

    if errors:
        return 2
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
