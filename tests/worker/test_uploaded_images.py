"""Jobs that name uploaded images (`image_id`, POST /v1/images) run on those images' bytes,
for the job's own tenant only (digin.worker.runner.image_resolver), on PostgreSQL and SQLite."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from digin.core.counterfactual.images import bundled_digit
from digin.service import repo
from digin.service.db import Job, Tenant
from digin.service.settings import fresh_settings
from digin.service.storage import LocalStorage
from digin.worker.runner import WorkerContext, execute_job
from tests.api.helpers import new_job
from tests.worker.helpers import normalised

FAST = {
    "targets": ["one"],
    "guidance": {"ddim_steps": 3, "iterations": 1, "num_cutouts": 2, "loss_steps": 2},
    "counterfactual": {"null_text_steps": 1, "p2p_fractions": [0.3]},
}


@pytest.fixture
def ctx(sessions: sessionmaker[Session], tmp_path: Path, model_cache) -> WorkerContext:
    return WorkerContext(
        settings=fresh_settings(data_dir=tmp_path / "data"),
        sessions=sessions,
        storage=LocalStorage(tmp_path / "artifacts"),
        enqueue=lambda **_: None,
        device="cpu",
        heartbeat_interval=0.2,
        cache=model_cache,
    )


def upload_digit(session: Session, tenant: Tenant, storage: LocalStorage) -> uuid.UUID:
    """What POST /v1/images stores: the bytes under a key, and the record."""
    pil, _label = bundled_digit("digits:test/0")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    key = f"{tenant.name}/images/{digest}.png"
    storage.put(key, data, "image/png")
    image, _ = repo.create_image(
        session, tenant_id=tenant.id, sha256=digest, format="PNG", width=pil.width,
        height=pil.height, size_bytes=len(data), storage_key=key,
    )  # fmt: skip
    session.commit()
    return image.id


def counterfactual(session: Session, tenant: Tenant, image_id: str) -> Job:
    params = normalised("counterfactual", {"image_id": image_id, **FAST})
    return new_job(session, tenant, kind="counterfactual", params=params, seed=0)


def reload(sessions: sessionmaker[Session], job: Job) -> Job:
    with sessions() as session:
        return session.get_one(Job, job.id)


def test_a_counterfactual_of_an_uploaded_image_runs_on_its_bytes(ctx, sessions, session, tenant):
    image_id = upload_digit(session, tenant, ctx.storage)
    job = counterfactual(session, tenant, str(image_id))
    assert execute_job(job.id, ctx=ctx) == "succeeded"
    done = reload(sessions, job)
    assert done.result["summary"]["image"]["source"] == f"id:{image_id}"
    names = {a["name"] for a in done.result["artifacts"]}
    assert {"original.png", "result.json"} <= names


def test_an_unknown_or_foreign_image_id_fails_the_job_naming_it(ctx, sessions, session, tenant):
    other = repo.ensure_tenant(session, name="other")
    session.commit()
    foreign = upload_digit(session, other, ctx.storage)
    for image_id in (str(uuid.uuid4()), str(foreign)):
        job = counterfactual(session, tenant, image_id)
        assert execute_job(job.id, ctx=ctx) == "failed"
        row = reload(sessions, job)
        assert row.error["code"] == "invalid_params" and row.error["retryable"] is False
        assert image_id in row.error["message"] and "no such uploaded image" in row.error["message"]
