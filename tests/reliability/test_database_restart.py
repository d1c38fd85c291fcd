"""PostgreSQL crashes (immediate shutdown) while a job runs and comes back: meanwhile the API
answers 503 problems (readiness names the database) instead of 500s; afterwards it recovers, the
worker's writes go through (retried), and no job is stuck: every job succeeds once."""

from __future__ import annotations

import time
from collections import Counter

from fastapi.testclient import TestClient

from digin.api.app import create_app
from digin.service import repo
from digin.service.db import RUNNING
from tests.reliability.stack import deployment, wait_until
from tests.worker.helpers import digits_params

JOBS = 3
OUTAGE_S = 6.0  # longer than the rest of a job, shorter than the stale threshold (10 s)


def test_postgres_restart_gives_503s_then_recovers_with_no_job_stuck(servers: dict):
    postgres = servers["postgres"]
    with deployment(**servers) as dep:
        with dep.sessions() as session:
            _, secret = repo.create_api_key(session, tenant_name="rel-pg")
            session.commit()
        auth = {"Authorization": f"Bearer {secret}"}
        dep.start_worker("w1")
        ids = [dep.submit("rel-pg", digits_params(iterations=6)) for _ in range(JOBS)]
        # the models are loaded once the first job is done; the outage then starts in the
        # middle of the second, which finishes computing during it: its final write waits
        wait_until("the first job to finish", lambda: dep.rows(ids)[ids[0]].status != RUNNING
                   and dep.rows(ids)[ids[0]].finished_at, 120)  # fmt: skip
        wait_until(
            "the second job to be optimising",
            lambda: (
                (dep.rows(ids)[ids[1]].progress or {}).get("step", 0) >= 1
                and dep.rows(ids)[ids[1]].status == RUNNING
            ),
            120,
            0.05,
        )
        with TestClient(create_app(dep.settings), raise_server_exceptions=False) as api:
            assert api.get("/readyz").status_code == 200
            postgres.crash()
            down_since = time.monotonic()
            statuses = []
            while time.monotonic() - down_since < OUTAGE_S:
                ready = api.get("/readyz")
                job = api.get(f"/v1/jobs/{ids[0]}", headers=auth)
                statuses += [ready.status_code, job.status_code]
                for response in (ready, job):
                    assert response.headers["content-type"] == "application/problem+json"
                assert "database" in ready.json()["detail"]
                time.sleep(0.5)
            assert set(statuses) == {503}, statuses
            postgres.start()
            wait_until("the API to be ready again", lambda: api.get("/readyz").status_code == 200,
                       60, 0.5)  # fmt: skip
            dep.start_reaper()
            rows = dep.wait_terminal(ids, timeout=150)
            for job_id in ids:
                body = api.get(f"/v1/jobs/{job_id}", headers=auth).json()
                assert body["status"] == "succeeded", body

        assert Counter(r.status for r in rows.values()) == {"succeeded": JOBS}
        assert all(r.attempts == 1 for r in rows.values())  # no write lost to the outage
        events = dep.succeeded_events()
        assert all(events.get(str(i)) == 1 for i in ids), events
        worker_log = [x for w in dep.workers for x in w.lines()]
        retried = [x for x in worker_log if x.get("event") in ("heartbeat_error", "db_retry")]
        assert retried, "the worker never noticed the outage"
        attempts = sorted(r.attempts for r in rows.values())
        print(f"\npostgres restart: attempts {attempts}, {len(retried)} failed worker writes "
              f"retried, API answers {Counter(statuses)}")  # fmt: skip
