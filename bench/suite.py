"""Test suite time: runs pytest (the whole suite, or one run per directory) with a JUnit report,
and prints and writes the wall time, the load average and, per directory, the tests, the
failures and the sum of the tests' own durations. `--junit` summarises reports written earlier
instead of running anything.

    python bench/suite.py [--per-directory] [--out bench/results/suite.json] [-- PYTEST ARGS]
    python bench/suite.py --junit REPORT.xml [REPORT.xml ...] [--out ...]

`python bench/suite.py -- -n 2` times CI's command (`pytest -q -n 2`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def directory_of(case: ET.Element) -> str:
    """tests/<dir> of a JUnit test case (classname `tests.e2e.test_x`), or the file for the
    files directly under tests/."""
    parts = case.get("classname", "").split(".")
    return (
        "/".join(parts[:2])
        if len(parts) > 2 and parts[2].startswith("test_")
        else ("/".join(parts[:2]) + ".py")
    )


def summarise(report: Path) -> dict[str, dict[str, Any]]:
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"tests": 0, "failed": 0, "skipped": 0, "test_seconds": 0.0}
    )
    for case in ET.parse(report).getroot().iter("testcase"):
        entry = per[directory_of(case)]
        entry["tests"] += 1
        entry["test_seconds"] += float(case.get("time", 0.0))
        entry["failed"] += any(case.find(t) is not None for t in ("failure", "error"))
        entry["skipped"] += case.find("skipped") is not None
    return {k: {**v, "test_seconds": round(v["test_seconds"], 1)} for k, v in sorted(per.items())}


def run(paths: list[str], pytest_args: list[str], report: Path) -> dict[str, Any]:
    load = os.getloadavg()
    started = time.monotonic()
    argv = [sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *pytest_args, *paths]
    code = subprocess.run(argv, cwd=ROOT).returncode
    return {"argv": argv[2:], "exit": code, "wall_s": round(time.monotonic() - started, 1),
            "load_before": [round(x, 2) for x in load],
            "load_after": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-directory", action="store_true", help="one pytest per directory")
    parser.add_argument("--junit", type=Path, nargs="+", help="summarise these reports only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/suite.json")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    if args.junit:
        runs = [{"report": str(r), "directories": summarise(r)} for r in args.junit]
    else:
        tests = ROOT / "tests"
        groups = (
            [[str(p.relative_to(ROOT))] for p in sorted(tests.iterdir())
             if p.is_dir() and p.name != "__pycache__" or p.name.startswith("test_")]
            if args.per_directory else [["tests"]]
        )  # fmt: skip
        for i, paths in enumerate(groups):
            report = args.out.with_name(f"{args.out.stem}-{i}.xml")
            runs.append(run(paths, args.pytest_args, report) | {"directories": summarise(report)})
    result = {"runs": runs, "cpus": os.cpu_count()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for entry in runs:
        print(entry.get("argv") or entry.get("report"), entry.get("wall_s", ""))
        for name, d in entry["directories"].items():
            print(
                f"  {name:<36}{d['tests']:>6} tests{d['failed']:>4} failed{d['test_seconds']:>9} s"
            )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
