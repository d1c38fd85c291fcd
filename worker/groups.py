"""Batched execution of sweep items (docs/architecture.md §9.9): one optimisation for several jobs.

A worker that claims a sweep item (the leader) also claims up to N more queued items of the
same batch with the same group key (same kind, models and settings; `digin.service.repo.batches.
claim_group_peers`, the claim semantics of `claim_job`), runs all their items through the
core's batch dimension in ONE optimisation (`digin.core.groups.run_group`), then uploads each job's
artifacts under its own deterministic key and finishes each job on its own. Every job keeps
its own attempt number, heartbeat, cancel and failure handling:

- one heartbeat thread writes every job's `heartbeat_at` and progress; a job whose cancel was
  requested is marked canceled at once (its images are dropped when the run ends); a job the
  reaper gave away ('lost') gets nothing written; the run stops early only when every job
  of the group has stopped;
- an error of the shared run is settled for every job (failed or re-queued per its attempt).

The group's size (DIGIN_BATCH_MAX_ITEMS images; on CUDA also DIGIN_BATCH_MEMORY_MB, using the
peak memory per image measured on this process's earlier runs of the same group key) is
decided before the peers are claimed.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import SQLAlchemyError

from digin.core.limits import LRU
from digin.service import repo
from digin.service.db import session_scope
from digin.service.repo.batches import claim_group_peers
from digin.worker.execution import (
    ClaimedJob,
    JobFailure,
    Outcome,
    WorkerContext,
    classify,
    json_safe,
    settle_failure,
    stopped,
    upload,
    write,
)
from digin.worker.memory import release_memory

log = logging.getLogger("digin.worker")

# peak GPU memory per image of a group key, measured by this process (MB); keyed by what
# clients send (a hash of their settings), so only the most recently measured are kept
MEASURED_KEYS = 256
_MEASURED_MB: LRU[str, float] = LRU(MEASURED_KEYS)


def job_items(job: ClaimedJob) -> int:
    """Images a job optimises: (classes or neurons) × images per class."""
    refs = job.params.get("neurons") or job.params.get("classes") or []
    return max(1, len(refs)) * int(job.params.get("images_per_class") or 1)


def group_capacity(
    *, max_items: int, memory_mb: int | None, per_image_mb: float | None, device: str
) -> int:
    """Images one batched run may hold: DIGIN_BATCH_MAX_ITEMS, and on CUDA with a memory
    budget also budget / measured MB per image (1 until a run of the group key was measured,
    so the first run measures)."""
    if memory_mb is None or not device.startswith("cuda"):
        return max_items
    if per_image_mb is None:
        return 1
    return max(1, min(max_items, int(memory_mb // max(per_image_mb, 1e-6))))


# --- heartbeats of a group ---------------------------------------------------------------------
class GroupPulse:
    """The heartbeats of every job of a group, written by one thread in one transaction per
    beat; `view(job)` gives each job the `JobPulse` interface the shared helpers use."""

    def __init__(self, ctx: WorkerContext, jobs: list[ClaimedJob]) -> None:
        self.ctx, self.jobs = ctx, jobs
        self.outcomes: dict[uuid.UUID, repo.HeartbeatOutcome] = {j.id: "continue" for j in jobs}
        self.canceled: set[uuid.UUID] = set()  # marked canceled by this pulse
        self.progress: dict[uuid.UUID, dict[str, Any] | None] = {j.id: None for j in jobs}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="group-pulse", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._done.wait(self.ctx.heartbeat_interval):
            self.beat()

    def update_all(self, progress: dict[str, Any]) -> None:
        for job in self.jobs:
            self.progress[job.id] = progress

    def beat(self, only: uuid.UUID | None = None) -> None:
        """Heartbeat the jobs still held (or just `only`); mark canceled at once those whose
        cancel was requested."""
        with self._lock:
            live = [j for j in self.jobs if self.outcomes[j.id] != "lost"]
            if only is not None:
                live = [j for j in live if j.id == only]
            try:
                with session_scope(self.ctx.sessions) as session:
                    for job in live:
                        if job.id in self.canceled:
                            continue
                        outcome = repo.heartbeat(
                            session, job_id=job.id, attempt=job.attempt,
                            progress=self.progress[job.id],
                        )  # fmt: skip
                        if outcome == "cancel" and repo.mark_canceled(
                            session, job_id=job.id, attempt=job.attempt
                        ):
                            self.canceled.add(job.id)
                        if outcome != self.outcomes[job.id]:
                            event = {"job_id": str(job.id), "event": f"heartbeat_{outcome}"}
                            log.info(f"heartbeat: {outcome}", extra=event)
                        if self.outcomes[job.id] == "continue" or outcome == "lost":
                            self.outcomes[job.id] = outcome
            except SQLAlchemyError as exc:  # the database is away: keep working, retry later
                log.warning(f"group heartbeat failed: {exc}", extra={"event": "heartbeat_error"})

    def all_stopped(self) -> bool:
        return all(o != "continue" for o in self.outcomes.values())

    def view(self, job: ClaimedJob) -> JobBeat:
        return JobBeat(self, job)


@dataclass
class JobBeat:
    """One job's side of a GroupPulse, a `digin.worker.execution.JobPulse` like
    `digin.worker.runner.Pulse`."""

    group: GroupPulse
    job: ClaimedJob

    @property
    def outcome(self) -> repo.HeartbeatOutcome:
        return self.group.outcomes[self.job.id]

    def update(self, progress: dict[str, Any], *, now: bool = False) -> None:
        previous = self.group.progress[self.job.id]
        self.group.progress[self.job.id] = progress
        if now or previous is None or previous.get("stage") != progress.get("stage"):
            self.group.beat(only=self.job.id)

    def should_stop(self) -> bool:
        return self.outcome != "continue"

    def stop(self) -> None:  # the group's thread stops once for all
        pass


# --- the group ---------------------------------------------------------------------------------
def execute_group(leader: ClaimedJob, ctx: WorkerContext) -> Outcome:
    """Claim the leader's compatible peers, run them all as one optimisation, and finish each
    job on its own; returns the leader's outcome."""
    jobs = [leader, *_claim_peers(leader, ctx)]
    fields = {"job_id": str(leader.id), "batch_id": str(leader.batch_id)}
    log.info(
        f"batched run of {len(jobs)} jobs",
        extra={**fields, "event": "group", "jobs": [str(j.id) for j in jobs]},
    )
    pulse = GroupPulse(ctx, jobs)
    pulse.update_all({"step": 0, "total": None, "stage": "loading"})
    pulse.beat()
    pulse.start()
    outcomes: dict[uuid.UUID, Outcome] = {}
    results: list[Any] = []
    failures: list[JobFailure] = []
    try:
        results = _run(jobs, ctx, pulse)
    except (Exception, SoftTimeLimitExceeded) as exc:
        failures = [exc if isinstance(exc, JobFailure) else classify(exc, job) for job in jobs]
    if failures:
        pulse.stop()
        if any(f.code == "resource_limit" for f in failures):
            release_memory()  # the run's frames are gone: so are its tensors
        for job, failure in zip(jobs, failures, strict=True):
            outcomes[job.id] = _settle(job, ctx, pulse, failure)
        return outcomes[leader.id]
    try:
        for job, result in zip(jobs, results, strict=True):
            outcomes[job.id] = _finish_one(job, ctx, pulse, result)
    finally:
        pulse.stop()
    return outcomes[leader.id]


def _claim_peers(leader: ClaimedJob, ctx: WorkerContext) -> list[ClaimedJob]:
    settings = ctx.settings
    device = ctx.resolve_device()
    assert leader.group_key is not None and leader.batch_id is not None
    capacity = group_capacity(
        max_items=settings.batch_max_items, memory_mb=settings.batch_memory_mb,
        per_image_mb=_MEASURED_MB.get(leader.group_key), device=device,
    )  # fmt: skip
    job_cap = (leader.params.get("guidance") or {}).get("max_batch")  # a preset's own limit
    if isinstance(job_cap, int) and job_cap >= 1:
        capacity = min(capacity, job_cap)
    more = capacity // job_items(leader) - 1
    if more <= 0:
        return []
    try:
        with session_scope(ctx.sessions) as session:
            rows = claim_group_peers(
                session, tenant_id=leader.tenant_id, batch_id=leader.batch_id,
                group_key=leader.group_key, limit=more, worker=ctx.identity(),
                max_running=settings.max_running_per_tenant,
            )  # fmt: skip
            peers = [ClaimedJob.from_row(row, tenant=leader.tenant) for row in rows]
    except SQLAlchemyError:
        log.exception("claiming peers failed: running alone", extra={"event": "db_error"})
        return []
    return peers


def _run(jobs: list[ClaimedJob], ctx: WorkerContext, pulse: GroupPulse) -> list[Any]:
    """The shared optimisation; one JobResult per job (None for each when every job stopped
    before the run had anything to show)."""
    from digin.core.context import Stopped
    from digin.core.groups import run_group

    device = ctx.resolve_device()
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(torch.device(device))

    def progress(step: int, total: int, _info: dict[str, Any]) -> None:
        pulse.update_all({"step": step, "total": total, "stage": "optimizing"})

    try:
        results = run_group(
            jobs[0].kind,
            [(job.params, job.seed) for job in jobs],
            device=device,
            cache=ctx.model_cache(),
            progress=progress,
            should_stop=pulse.all_stopped,
        )
    except Stopped:  # every job stopped inside the first iteration: nothing to show
        return [None] * len(jobs)
    if cuda and jobs[0].group_key is not None:
        import torch

        peak_mb = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
        _MEASURED_MB[jobs[0].group_key] = peak_mb / sum(map(job_items, jobs))
    return results


def _finish_one(job: ClaimedJob, ctx: WorkerContext, pulse: GroupPulse, result: Any) -> Outcome:
    """Render, upload under the job's own keys, and finish one job of the group (`result`
    None: the run stopped before it had anything, which only a stop of every job does)."""
    from digin.core.output import render_artifacts

    view = pulse.view(job)
    if view.should_stop():
        if job.id in pulse.canceled:
            log.info("canceled", extra={"job_id": str(job.id), "event": "canceled"})
            return "canceled"
        return stopped(job, ctx, view, uploaded=False)
    if result is None:
        failure = JobFailure("fail", "internal", "the batched run stopped with this job running")
        return _settle(job, ctx, pulse, failure)
    try:
        artifacts: dict[str, Any] = dict(render_artifacts(result))
        artifacts["__summary__"] = json_safe(result.summary())
        listing = upload(job, ctx, view, artifacts)
    except JobFailure as failure:
        return _settle(job, ctx, pulse, failure)
    except Exception as exc:
        return _settle(job, ctx, pulse, classify(exc, job))
    if listing is None or view.should_stop():
        if job.id in pulse.canceled:
            return "canceled"
        return stopped(job, ctx, view, uploaded=True)
    summary = artifacts["__summary__"]
    result_row = {"summary": summary, "artifacts": listing}
    done = write(
        ctx, lambda s: repo.finish_job(s, job_id=job.id, attempt=job.attempt, result=result_row)
    )
    if not done:
        log.warning("attempt lost before finishing", extra={"job_id": str(job.id), "event": "lost"})
        return "lost"
    log.info(
        "succeeded",
        extra={"job_id": str(job.id), "attempt": job.attempt, "event": "succeeded",
               "artifacts": len(listing), "group": len(pulse.jobs)},
    )  # fmt: skip
    return "succeeded"


def _settle(job: ClaimedJob, ctx: WorkerContext, pulse: GroupPulse, failure: JobFailure) -> Outcome:
    if job.id in pulse.canceled:
        return "canceled"
    return settle_failure(job, ctx, failure, pulse.view(job))
