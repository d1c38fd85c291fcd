"""The reaper round (`digin.worker.reaper.reap_once`): re-queue and re-send, fail at the cap."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

from digin.service import repo
from digin.service.db import Job, utcnow
from digin.service.settings import fresh_settings
from digin.worker.reaper import reap_once, reaper_interval, run_reaper
from digin.worker.runner import pid_namespace
from tests.api.helpers import new_job
from tests.worker.test_runner import Sent

WORKER = {"host": "gpu-1", "pid": 1}


def settings(tmp_path: Path):
    return fresh_settings(data_dir=tmp_path, heartbeat_stale_seconds=10, queued_stale_seconds=60)


def test_a_dead_workers_job_is_requeued_and_sent_at_once(sessions, session, tenant, tmp_path):
    job = new_job(session, tenant, priority=3)
    repo.mark_enqueued(session, job_id=job.id)
    repo.claim_job(session, job_id=job.id, worker=WORKER)
    session.commit()
    sent = Sent()
    # 11 s later: the heartbeat is stale; the job is younger than the unsent grace period, but
    # its message went with the worker, so it is sent now.
    report = reap_once(sessions=sessions, settings=settings(tmp_path), enqueue=sent,
                       now=utcnow() + timedelta(seconds=11))  # fmt: skip
    assert report.requeued == [job.id]
    assert sent == [{"job_id": job.id, "queue": "interactive", "priority": 3, "countdown": 0.0}]
    with sessions() as s:
        row = s.get_one(Job, job.id)
        assert (row.status, row.attempts, row.worker) == ("queued", 1, None)
        assert row.enqueued_at is not None


def test_last_attempt_fails_with_worker_lost(sessions, session, tenant, tmp_path):
    job = new_job(session, tenant, max_attempts=1)
    repo.claim_job(session, job_id=job.id, worker=WORKER)
    session.commit()
    sent = Sent()
    report = reap_once(sessions=sessions, settings=settings(tmp_path), enqueue=sent,
                       now=utcnow() + timedelta(seconds=11))  # fmt: skip
    assert report.failed == [job.id] and sent == []
    with sessions() as s:
        row = s.get_one(Job, job.id)
        assert row.status == "failed" and row.error["code"] == "worker_lost"


def test_a_job_whose_message_was_never_sent_is_sent(sessions, session, tenant, tmp_path):
    job = new_job(session, tenant)  # committed, but the API died before enqueueing
    fresh = new_job(session, tenant)  # just created: its API is still about to send it
    sent = Sent()
    reap_once(sessions=sessions, settings=settings(tmp_path), enqueue=sent,
              now=utcnow() + timedelta(seconds=61), unsent_grace_seconds=60)  # fmt: skip
    assert {m["job_id"] for m in sent} == {job.id, fresh.id}
    sent.clear()
    reap_once(sessions=sessions, settings=settings(tmp_path), enqueue=sent)
    assert sent == []  # marked enqueued: not sent again until queued_stale_seconds


def test_a_failing_broker_leaves_the_job_for_the_next_round(sessions, session, tenant, tmp_path):
    job = new_job(session, tenant)

    def broken(**_kwargs):
        raise ConnectionError("broker down")

    later = utcnow() + timedelta(seconds=120)
    reap_once(sessions=sessions, settings=settings(tmp_path), enqueue=broken, now=later)
    with sessions() as s:
        assert s.get_one(Job, job.id).enqueued_at is None
    sent = Sent()
    reap_once(sessions=sessions, settings=settings(tmp_path), enqueue=sent, now=later)
    assert [m["job_id"] for m in sent] == [job.id]


def test_the_loop_runs_rounds_until_stopped(sessions, tenant, tmp_path):
    stop, rounds = threading.Event(), []

    def on_round(report):
        rounds.append(report)
        if len(rounds) == 3:
            stop.set()

    thread = threading.Thread(target=run_reaper, kwargs={
        "sessions": sessions, "settings": settings(tmp_path), "enqueue": Sent(), "stop": stop,
        "interval": 0.01, "on_round": on_round})  # fmt: skip
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and len(rounds) == 3
    assert reaper_interval(settings(tmp_path)) == 2.5
    assert reaper_interval(fresh_settings(data_dir=tmp_path)) == 30.0


def test_old_jobs_whose_messages_the_broker_holds_are_not_sent_again(
    sessions, session, tenant, tmp_path
):
    """A deep queue (a big sweep) waits longer than queued_stale_seconds: while the broker
    (here the real filesystem broker) holds a message per queued job, the reaper re-stamps
    the old jobs instead of piling up duplicates; a lost message is re-sent."""
    from digin.service.dispatch import enqueue, make_celery
    from digin.worker.reaper import broker_depths_reader

    config = settings(tmp_path)
    celery = make_celery(config)
    jobs = [new_job(session, tenant) for _ in range(3)]
    for job in jobs:
        enqueue(celery, job_id=str(job.id), queue="interactive")
        repo.mark_enqueued(session, job_id=job.id)
    session.commit()
    depths = broker_depths_reader(config)
    assert depths is not None and depths()["interactive"] == 3
    later = utcnow() + timedelta(seconds=61)
    sent = Sent()
    report = reap_once(sessions=sessions, settings=config, enqueue=sent, now=later,
                       broker_depths=depths)  # fmt: skip
    assert sent == [] and sorted(report.verified) == sorted(j.id for j in jobs)
    with sessions() as s:
        assert {s.get_one(Job, j.id).enqueued_at for j in jobs} == {later}
    # one message is lost (the broker was flushed): the next stale round re-sends them all
    folder = Path(config.broker_transport_options()["data_folder_in"])
    next(folder.glob("*.interactive.msg")).unlink()
    report = reap_once(sessions=sessions, settings=config, enqueue=sent,
                       now=later + timedelta(seconds=61), broker_depths=depths)  # fmt: skip
    assert report.verified == [] and sorted(m["job_id"] for m in sent) == sorted(j.id for j in jobs)
    # without a way to count the broker's messages, old jobs are re-sent as before
    assert broker_depths_reader(fresh_settings(data_dir=tmp_path, broker_url="memory://")) is None


def test_a_job_whose_local_worker_process_is_gone_is_recovered_at_once(
    sessions, session, tenant, tmp_path
):
    """`digin serve` stopped mid-job: its worker ran on this host and its pid is gone, so the
    next round re-queues the job without waiting for the heartbeat to go stale."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    here = {"host": socket.gethostname(), "pidns": pid_namespace()}
    dead = {**here, "pid": int(gone.stdout)}
    alive = {**here, "pid": os.getpid()}
    elsewhere = {**here, "host": "gpu-7", "pid": int(gone.stdout)}
    other_namespace = {**here, "pidns": 1, "pid": int(gone.stdout)}  # a container on this host
    jobs = {}
    workers = {"dead": dead, "alive": alive, "elsewhere": elsewhere, "other": other_namespace}
    for name, worker in workers.items():
        jobs[name] = new_job(session, tenant)
        repo.claim_job(session, job_id=jobs[name].id, worker=worker)
    session.commit()
    sent = Sent()
    report = reap_once(sessions=sessions, settings=settings(tmp_path), enqueue=sent)
    assert report.requeued == [jobs["dead"].id]
    assert [m["job_id"] for m in sent] == [jobs["dead"].id]
    with sessions() as s:
        assert s.get_one(Job, jobs["alive"].id).status == "running"
        assert s.get_one(Job, jobs["elsewhere"].id).status == "running"
        assert s.get_one(Job, jobs["other"].id).status == "running"
