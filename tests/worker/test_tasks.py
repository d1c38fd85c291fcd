"""The Celery tasks: registered under the shared names, thin over `execute_job`, retried when
the database is unreachable at claim time; the worker app imports without touching CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from digin.service.db import Job, make_engine, session_factory
from digin.service.dispatch import TASK_REAP, TASK_RUN_JOB, make_celery
from digin.service.settings import fresh_settings
from digin.worker import tasks
from digin.worker.runner import WorkerContext
from tests.api.helpers import new_job
from tests.worker.helpers import ROOT, normalised


def test_tasks_are_registered_and_run_the_job(sessions, session, tenant, tmp_path, model_cache,
                                              job_params):  # fmt: skip
    from digin.service.storage import LocalStorage
    from tests.worker.test_runner import Sent

    app = make_celery(fresh_settings(data_dir=tmp_path, broker_url="memory://"))
    registered = tasks.register_tasks(app)
    assert {TASK_RUN_JOB, TASK_REAP} <= set(app.tasks)
    ctx = WorkerContext(settings=fresh_settings(data_dir=tmp_path), sessions=sessions,
                        storage=LocalStorage(tmp_path / "artifacts"), enqueue=Sent(),
                        device="cpu", cache=model_cache)  # fmt: skip
    job = new_job(session, tenant, params=normalised("guided", job_params()))
    tasks.use_context(ctx)
    try:
        assert registered[TASK_RUN_JOB].run(str(job.id)) == "succeeded"
        assert registered[TASK_RUN_JOB].run(str(job.id)) == "skipped"
        assert registered[TASK_REAP].run() == {"requeued": [], "failed": [], "canceled": [],
                                               "enqueued": [], "verified": []}  # fmt: skip
    finally:
        tasks.use_context(None)
    with sessions() as s:
        assert s.get_one(Job, job.id).status == "succeeded"


def test_an_unreachable_database_at_claim_retries_the_message(tmp_path, caplog):
    from digin.service.storage import LocalStorage
    from tests.worker.test_runner import Sent

    app = make_celery(fresh_settings(data_dir=tmp_path, broker_url="memory://"))
    registered = tasks.register_tasks(app)
    nowhere = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none",
                          connect_args={"connect_timeout": 1})  # fmt: skip
    ctx = WorkerContext(settings=fresh_settings(data_dir=tmp_path),
                        sessions=session_factory(nowhere), device="cpu",
                        storage=LocalStorage(tmp_path), enqueue=Sent())  # fmt: skip
    tasks.use_context(ctx)
    try:
        result = registered[TASK_RUN_JOB].apply(args=["00000000-0000-0000-0000-000000000001"])
    finally:
        tasks.use_context(None)
    # eager: the retries run at once (no countdown); then it gives up, the job row untouched
    assert result.state == "FAILURE" and "connection" in str(result.result)
    retries = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "claim_retry"]
    assert len(retries) == tasks.CLAIM_RETRIES + 1 and "giving up" in retries[-1]


def test_the_worker_app_imports_without_torch_or_a_database(tmp_path: Path):
    code = (
        "import sys, digin.worker.app as w; "
        "print(sorted(t for t in w.app.tasks if t.startswith('digin.'))); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'core')))"
    )
    env = {**os.environ, "DIGIN_DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    tasks = "['digin.reap', 'digin.run_job', 'digin.send_webhooks']"
    assert out.stdout.splitlines() == [tasks, "[]"]
