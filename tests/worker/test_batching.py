"""Batched execution of sweep items: several jobs of a batch as one optimisation through the
core's batch dimension, on the digits zoo (2 iterations), real PostgreSQL and SQLite, real
local storage."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from digin.api.schemas import BatchCreate
from digin.api.sweeps import plan_batch
from digin.core.groups import run_group
from digin.core.kinds import run_job
from digin.service import repo
from digin.service.db import Job, Tenant
from digin.service.repo.batches import create_batch
from digin.service.settings import fresh_settings
from digin.service.storage import LocalStorage, artifact_key
from digin.worker import groups
from digin.worker.groups import group_capacity
from digin.worker.runner import WorkerContext, execute_job

TEMPLATE = {"guidance": {"iterations": 2}}


def new_batch(session: Session, tenant: Tenant, **axes: Any) -> list[Job]:
    body = BatchCreate(kind="guided", params_template=TEMPLATE, **axes)
    plan = plan_batch(body, allow_list=None, allow_paths=True, max_items=1000)
    batch, _ = create_batch(
        session,
        tenant_id=tenant.id,
        plan=plan,
        params_template=TEMPLATE,
        priority=5,
        max_attempts=3,
    )
    session.commit()
    return list(
        session.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.item_index))
    )


@pytest.fixture
def ctx(sessions: sessionmaker[Session], tmp_path: Path, model_cache: Any) -> WorkerContext:
    sent: list[dict[str, Any]] = []
    return WorkerContext(
        settings=fresh_settings(data_dir=tmp_path / "data", batch_max_items=4),
        sessions=sessions,
        storage=LocalStorage(tmp_path / "artifacts"),
        enqueue=lambda **kw: sent.append(kw),
        device="cpu",
        heartbeat_interval=0.2,
        cache=model_cache,
    )


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def test_a_group_gives_the_images_of_one_by_one_runs(model_cache: Any):
    from digin.core.params import validate_params

    jobs = [
        (validate_params("guided", {"classes": [c], **TEMPLATE}), seed)
        for c, seed in ((1, 11), (4, 12), (7, 13))
    ]
    together = run_group("guided", jobs, device="cpu", cache=model_cache)
    assert [r.guidance.images.shape[0] for r in together] == [1, 1, 1]
    for (params, seed), grouped in zip(jobs, together, strict=True):
        alone = run_job("guided", params, seed=seed, device="cpu", cache=model_cache)
        assert grouped.items[0].seed == seed and grouped.items[0].index == 0
        assert grouped.items[0].class_index == alone.items[0].class_index
        np.testing.assert_allclose(
            grouped.guidance.images.numpy(), alone.guidance.images.numpy(), atol=2e-4, rtol=0
        )
        np.testing.assert_allclose(
            grouped.guidance.clean_loss.numpy(),
            alone.guidance.clean_loss.numpy(),
            atol=1e-4,
            rtol=1e-4,
        )
        assert grouped.guidance.best_iteration == alone.guidance.best_iteration


def test_jobs_that_differ_in_more_than_their_items_do_not_group(model_cache: Any):
    jobs = [({"classes": [1], **TEMPLATE}, 0), ({"classes": [2], "guidance": {"iterations": 3}}, 0)]
    with pytest.raises(ValueError, match="must share everything but"):
        run_group("guided", jobs, device="cpu", cache=model_cache)


def test_a_sweep_item_runs_with_its_peers_and_each_job_finishes_on_its_own(
    ctx: WorkerContext, sessions, session, tenant: Tenant, model_cache: Any
):
    jobs = new_batch(session, tenant, classes=[2, 5, 8], classifiers=["digits:cnn", "digits:mlp"])
    assert execute_job(jobs[0].id, ctx=ctx) == "succeeded"
    with sessions() as s:
        rows = {j.item_index: j for j in s.scalars(select(Job))}
    # the leader and its two compatible peers (same classifier) ran; the mlp items did not
    assert [rows[i].status for i in range(6)] == ["succeeded"] * 3 + ["queued"] * 3
    assert {rows[i].attempts for i in range(3)} == {1}
    storage: LocalStorage = ctx.storage  # type: ignore[assignment]
    for i in range(3):
        job = rows[i]
        names = [a["name"] for a in job.result["artifacts"]]
        assert "item_000.png" in names and "result.json" in names
        assert all(
            a["key"] == artifact_key(tenant.name, job.id, a["name"])
            for a in job.result["artifacts"]
        )
        summary = job.result["summary"]
        assert summary["seed"] == job.seed and summary["params"]["classes"] == job.params["classes"]
    # the same images as the peer run alone
    alone = run_job("guided", rows[1].params, seed=rows[1].seed, device="cpu", cache=model_cache)
    stored = pixels(storage.get(artifact_key(tenant.name, rows[1].id, "item_000.png")))
    expected = np.asarray(alone.guidance.images[0].mul(255).round().byte().permute(1, 2, 0))
    assert np.abs(stored - expected.squeeze().astype(np.int16)).max() <= 1
    # a peer's own message, arriving later, finds it claimed and does nothing
    assert execute_job(rows[1].id, ctx=ctx) == "skipped"
    # the batch can be read as done for those three
    with sessions() as s:
        batch = repo.get_job(s, tenant_id=tenant.id, job_id=rows[0].id)
        assert batch is not None and batch.batch_id is not None


def test_cancel_of_one_item_during_a_batched_run(
    ctx: WorkerContext, sessions, session, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
):
    jobs = new_batch(session, tenant, classes=[1, 3, 6])
    victim = jobs[1]
    original = groups.GroupPulse.update_all

    def update_all(self: groups.GroupPulse, progress: dict[str, Any]) -> None:
        original(self, progress)
        if progress["stage"] == "optimizing" and progress["step"] == 1:
            with sessions() as api:  # the API, while the group runs
                assert repo.request_cancel(api, tenant_id=tenant.id, job_id=victim.id)
                api.commit()
            self.beat()  # the next heartbeat, made deterministic here

    monkeypatch.setattr(groups.GroupPulse, "update_all", update_all)
    assert execute_job(jobs[0].id, ctx=ctx) == "succeeded"
    with sessions() as s:
        status = {j.item_index: (j.status, j.result) for j in s.scalars(select(Job))}
    assert status[1] == ("canceled", None)
    assert status[0][0] == "succeeded" and status[2][0] == "succeeded"
    assert ctx.storage.list(artifact_key(tenant.name, victim.id, "x")[:-1]) == []


def test_the_running_cap_limits_the_peers(sessions, session, tenant: Tenant, ctx: WorkerContext):
    ctx.settings = fresh_settings(
        data_dir=ctx.settings.data_dir, batch_max_items=8, max_running_per_tenant=2
    )
    jobs = new_batch(session, tenant, classes=[0, 1, 2, 3])
    assert execute_job(jobs[0].id, ctx=ctx) == "succeeded"
    with sessions() as s:
        statuses = [j.status for j in s.scalars(select(Job).order_by(Job.item_index))]
    assert statuses == ["succeeded", "succeeded", "queued", "queued"]


def test_group_capacity():
    assert group_capacity(max_items=8, memory_mb=None, per_image_mb=None, device="cpu") == 8
    assert group_capacity(max_items=8, memory_mb=1000, per_image_mb=None, device="cpu") == 8
    assert group_capacity(max_items=8, memory_mb=1000, per_image_mb=None, device="cuda") == 1
    assert group_capacity(max_items=8, memory_mb=1000, per_image_mb=300, device="cuda:0") == 3
    assert group_capacity(max_items=2, memory_mb=1000, per_image_mb=10, device="cuda") == 2
    assert group_capacity(max_items=8, memory_mb=100, per_image_mb=300, device="cuda") == 1
