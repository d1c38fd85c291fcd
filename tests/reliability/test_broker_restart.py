"""Redis (the broker) crashes and comes back empty while jobs are queued and one is running:
no job is lost (the reaper re-sends the messages of queued jobs and re-queues the running one
whose worker lost it), none runs twice to success, each has one set of artifacts."""

from __future__ import annotations

from collections import Counter

from digin.service.db import RUNNING
from digin.service.storage import artifact_key
from tests.reliability.stack import deployment, wait_until
from tests.worker.helpers import artifact_names, digits_params

JOBS = 4


def test_redis_restart_loses_no_job_and_runs_none_twice(servers: dict):
    redis = servers["redis"]
    with deployment(**servers) as dep:
        dep.start_worker("w1")
        ids = [dep.submit("rel-redis", digits_params(iterations=3)) for _ in range(JOBS)]
        wait_until(
            "a job to be optimising",
            lambda: any(
                r.status == RUNNING and (r.progress or {}).get("stage") == "optimizing"
                for r in dep.rows(ids).values()
            ),
            120,
        )
        redis.restart()  # SIGKILL, then an empty Redis on the same port
        dep.start_reaper()
        rows = dep.wait_terminal(ids, timeout=150)

        assert Counter(r.status for r in rows.values()) == {"succeeded": JOBS}
        events = dep.succeeded_events()
        assert all(events.get(str(i)) == 1 for i in ids), events  # one success per job
        for job_id, row in rows.items():
            keys = dep.storage.list(artifact_key("rel-redis", job_id, "x")[:-1])
            assert keys == [artifact_key("rel-redis", job_id, n) for n in artifact_names(1)]
            assert [a["key"] for a in row.result["artifacts"]] == keys
        print(f"\nredis restart: {JOBS} jobs, attempts {sorted(r.attempts for r in rows.values())}")
