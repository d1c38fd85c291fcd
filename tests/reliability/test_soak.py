"""A small soak in the suite (`bench/soak.py` runs the large one): tiny digits jobs with random
worker SIGKILLs; every job ends terminal, none is lost, none runs twice to success, and every
succeeded job has exactly one result set. `DIGIN_SOAK_JOBS` / `DIGIN_SOAK_KILLS` change the
counts."""

from __future__ import annotations

import os

from tests.reliability.soak import run_soak
from tests.reliability.stack import deployment


def test_soak_with_random_worker_kills(servers: dict):
    jobs = int(os.environ.get("DIGIN_SOAK_JOBS", "20"))
    kills = int(os.environ.get("DIGIN_SOAK_KILLS", "2"))
    with deployment(**servers) as dep:
        report = run_soak(dep, jobs=jobs, workers=2, kills=kills, seed=1)
    print(f"\nsoak: {report.as_dict()}")
    assert report.lost == 0, report
    assert sum(report.statuses.values()) == jobs
    assert report.duplicates == 0 and report.bad_result_sets == 0, report
    # two kills cannot use up three attempts: every job succeeds
    if kills < 3:
        assert report.statuses == {"succeeded": jobs}, report
