"""Runs benchmarks: `python -m benchmarks.run [NAME ...] [--full]`.

Every module `benchmarks/NAME.py` that defines `main(full: bool) -> dict` is a
benchmark; its result is written to `benchmarks/results/NAME.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from benchmarks import common

_NOT_BENCHMARKS = {"common", "run"}


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    names = []
    for m in pkgutil.iter_modules([str(here)]):
        if m.name in _NOT_BENCHMARKS or m.name.startswith("_"):
            continue
        if hasattr(importlib.import_module(f"benchmarks.{m.name}"), "main"):
            names.append(m.name)
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks (default: all)")
    parser.add_argument("--full", action="store_true", help="longer runs")
    parser.add_argument("--list", action="store_true", help="list and exit")
    args = parser.parse_args(argv)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
    for name in args.names or names:
        start = time.time()
        module = importlib.import_module(f"benchmarks.{name}")
        result = module.main(full=args.full)
        result.setdefault("wall_seconds", round(time.time() - start, 1))
        # A module's side run (e.g. another model shape chosen through the
        # environment) names its own results: RESULT_NAME.
        path = common.write_result(getattr(module, "RESULT_NAME", name),
                                   result)
        summary = {k: v for k, v in result.items() if k in ("ratio", "target",
                                                           "meets_target")}
        print(f"[{name}] {json.dumps(summary)} -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
