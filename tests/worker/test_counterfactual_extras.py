"""A counterfactual job with a captioner and a segmenter through the worker's task
(digin.worker.runner.execute_job): the tiny BLIP and SAM-HQ load into the worker's model cache,
and the caption and the mask's record reach the job's result and artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from digin.service.db import Job
from digin.service.settings import fresh_settings
from digin.service.storage import LocalStorage
from digin.worker.runner import WorkerContext, execute_job
from tests.api.helpers import new_job
from tests.worker.helpers import normalised

FAST = {
    "image": "digits:test/0",
    "start_class": "zero",
    "targets": ["one"],
    "guidance": {"ddim_steps": 3, "iterations": 1, "num_cutouts": 2, "loss_steps": 2},
    "counterfactual": {"null_text_steps": 1, "p2p_fractions": [0.3], "caption_max_tokens": 4,
                       "caption_beams": 1},
}  # fmt: skip


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


def test_a_captioned_sam_refined_counterfactual_runs_in_the_worker(
    ctx, sessions, session, tenant, tiny_models
):
    models = {"captioner": tiny_models["captioner"], "segmenter": tiny_models["segmenter"]}
    params = normalised("counterfactual", {**FAST, **models})
    job = new_job(session, tenant, kind="counterfactual", params=params, seed=0)
    assert execute_job(job.id, ctx=ctx) == "succeeded"
    with sessions() as s:
        done = s.get_one(Job, job.id)
    summary = done.result["summary"]
    assert summary["caption_source"] == "captioner"
    assert summary["caption"].startswith("a handwritten digit zero")
    assert summary["models"]["captioner"] == models["captioner"]
    assert summary["mask"]["segmenter"]["spec"] == models["segmenter"]
    assert "caption.txt" in {a["name"] for a in done.result["artifacts"]}
    for role, spec in models.items():  # held by the worker's cache for the next job
        assert ctx.model_cache().get((role, spec, "cpu"), lambda: None) is not None
