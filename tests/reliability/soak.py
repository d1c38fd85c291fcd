"""The soak: many tiny digits jobs (one guidance iteration) through Redis, PostgreSQL
and S3 while workers are SIGKILLed at random and replaced; at the end every job must be terminal
with exactly one result set per succeeded job. Shared by `tests/reliability/test_soak.py` (a
small count) and `bench/soak.py` (the large one, figures to bench/results/soak.json)."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from digin.service.db import TERMINAL
from digin.service.storage import artifact_key
from tests.reliability.stack import Deployment, Worker, wait_until
from tests.worker.helpers import artifact_names, digits_params

TENANT = "soak"


@dataclass
class SoakReport:
    jobs: int
    workers: int
    kills: int  # workers SIGKILLed (faults injected; fewer if the jobs were done first)
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    failure_codes: dict[str, int] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)  # attempts → jobs
    lost: int = 0  # jobs not terminal at the end
    duplicates: int = 0  # jobs logged `succeeded` more than once
    bad_result_sets: int = 0  # succeeded jobs whose stored artifacts differ from their result
    failed_with_artifacts: int = 0  # failed/canceled jobs with objects left (a killed upload)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_soak(
    dep: Deployment,
    *,
    jobs: int,
    workers: int = 2,
    kills: int = 2,
    seed: int = 0,
    kill_gap_s: tuple[float, float] = (2.0, 8.0),
    timeout_s: float | None = None,
) -> SoakReport:
    """Run the soak on `dep` (its reaper is started here); returns the counts."""
    rng = random.Random(seed)
    report = SoakReport(jobs=jobs, workers=workers, kills=kills)
    start = time.monotonic()
    live: list[Worker] = [dep.start_worker(f"soak-w{i}", wait=False) for i in range(workers)]
    for worker in live:
        wait_until(f"worker {worker.name} to be ready", worker.ready, 120.0, 0.2)
    ids = [dep.submit(TENANT, digits_params(iterations=1)) for _ in range(jobs)]
    dep.start_reaper()
    report.kills = 0
    for k in range(kills):
        time.sleep(rng.uniform(*kill_gap_s))
        if _all_terminal(dep, ids):
            break
        victim = live.pop(rng.randrange(len(live)))
        victim.kill()
        report.kills += 1
        live.append(dep.start_worker(f"soak-r{k}", wait=False))
    rows = _wait(dep, ids, timeout_s or 120.0 + 2.0 * jobs + 30.0 * kills)
    report.seconds = round(time.monotonic() - start, 1)
    report.statuses = dict(Counter(r.status for r in rows.values()))
    report.failure_codes = dict(Counter((r.error or {}).get("code") for r in rows.values()
                                        if r.status == "failed"))  # fmt: skip
    report.attempts = dict(sorted(Counter(r.attempts for r in rows.values()).items()))
    report.lost = sum(r.status not in TERMINAL for r in rows.values()) + (len(ids) - len(rows))
    events = dep.succeeded_events()
    report.duplicates = sum(n > 1 for n in events.values())
    expected = artifact_names(1)
    for job_id, row in rows.items():
        keys = dep.storage.list(artifact_key(TENANT, job_id, "x")[:-1])
        if row.status == "succeeded":
            wanted = [artifact_key(TENANT, job_id, n) for n in expected]
            listed = [a["key"] for a in (row.result or {}).get("artifacts", [])]
            if keys != wanted or listed != wanted or events.get(str(job_id)) != 1:
                report.bad_result_sets += 1
        elif keys:
            report.failed_with_artifacts += 1
    return report


def _all_terminal(dep: Deployment, ids: list[uuid.UUID]) -> bool:
    try:
        return all(r.status in TERMINAL for r in dep.rows(ids).values())
    except Exception:
        return False


def _wait(dep: Deployment, ids: list[uuid.UUID], timeout: float) -> dict[uuid.UUID, Any]:
    try:
        return dep.wait_terminal(ids, timeout)
    except AssertionError:  # report what is left instead of failing here
        return dep.rows(ids)
