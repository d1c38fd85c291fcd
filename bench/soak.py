"""Soak benchmark: `--jobs` tiny digits jobs (one guidance iteration) through a private
Redis, PostgreSQL and S3 (moto) while `--kills` random workers are SIGKILLed and replaced; the
reaper recovers their jobs. Prints and writes the counts: faults injected, jobs run, jobs lost,
duplicates, result sets, attempts, wall time (tests/reliability/soak.py does the work; the suite
runs a small count of the same thing).

    python bench/soak.py [--jobs 500] [--workers 2] [--kills 20] [--out bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.reliability.soak import run_soak  # noqa: E402
from tests.reliability.stack import S3, PrivatePostgres, PrivateRedis, deployment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-gap", type=float, nargs=2, default=(5.0, 20.0),
                        metavar=("MIN_S", "MAX_S"), help="seconds between two kills")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/soak.json")
    args = parser.parse_args()
    for name in [n for n in os.environ if n.startswith("DIGIN_")]:
        del os.environ[name]

    from digin.service.db import migrate

    folder = Path(tempfile.mkdtemp(prefix="digin-soak-"))
    redis, postgres, s3 = PrivateRedis(folder / "redis"), PrivatePostgres(), S3()
    redis.start()
    postgres.init()
    try:
        migrate(postgres.url())
        with deployment(redis=redis, postgres=postgres, s3=s3, folder=folder / "run") as dep:
            report = run_soak(dep, jobs=args.jobs, workers=args.workers, kills=args.kills,
                              seed=args.seed, kill_gap_s=tuple(args.kill_gap),
                              timeout_s=600.0 + 5.0 * args.jobs)  # fmt: skip
    finally:
        s3.stop()
        postgres.stop()
        redis.stop()
    figures = report.as_dict() | {
        "jobs_per_second": round(report.jobs / report.seconds, 3) if report.seconds else None,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },  # fmt: skip
    }
    print(json.dumps(figures, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
