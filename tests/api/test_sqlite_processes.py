"""Embedded mode: an API and workers in separate processes share one SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from digin.service import repo
from digin.service.db import Job, make_engine, migrate, session_factory

ROOT = Path(__file__).resolve().parents[2]

# One process's share of the traffic: submit, claim, heartbeat, finish, each its own commit.
SCRIPT = """
import sys
from digin.service import repo
from digin.service.db import make_engine, session_factory

url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sessions = session_factory(make_engine(url))
with sessions() as s:
    tenant = repo.ensure_tenant(s, name=name)
    s.commit()
    for i in range(n):
        job, _ = repo.create_job(s, tenant_id=tenant.id, kind="guided", params={"i": i}, seed=i,
                                 priority=0, queue="interactive", max_attempts=3, max_queued=100)
        s.commit()
        claimed = repo.claim_job(s, job_id=job.id, worker={"pid": name}, max_running=4)
        s.commit()
        assert repo.heartbeat(s, job_id=job.id, attempt=claimed.attempts, progress={"step": 1}) \
            == "continue"
        s.commit()
        assert repo.finish_job(s, job_id=job.id, attempt=claimed.attempts, result={"i": i})
        s.commit()
"""


def test_processes_share_one_sqlite_file(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'digin.db'}"
    migrate(url)
    sessions = session_factory(engine := make_engine(url))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with sessions() as reader:
        # A long-lived session that has read (a worker in the middle of a job) blocks no writer.
        assert reader.scalar(select(func.count()).select_from(Job)) == 0
        procs = [
            subprocess.Popen([sys.executable, "-c", SCRIPT, url, f"proc{k}", "15"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for k in range(2)
        ]  # fmt: skip
        outputs = [p.communicate()[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        tenants = [repo.get_tenant(reader, name=f"proc{k}") for k in range(2)]
        for tenant in tenants:
            done = repo.count_jobs(reader, tenant_id=tenant.id, statuses=["succeeded"])
            assert done == 15
    engine.dispose()
