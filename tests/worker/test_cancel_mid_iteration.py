"""A cancel that arrives inside a long optimisation iteration (docs/architecture.md §8.7), in
the worker task on real PostgreSQL and SQLite: the core stops at the next DDIM step, the job is
recorded canceled, nothing is uploaded. Counted in UNet calls, never in time."""

from __future__ import annotations

from typing import Any

import pytest

from digin.service import repo
from digin.worker import runner
from digin.worker.runner import execute_job
from tests.worker.test_runner import (  # noqa: F401 - fixtures
    ctx,
    folder,
    reload,
    sent,
    submit,
)


@pytest.mark.parametrize("cancel_at", [30, 150])  # in the chain; in the backward pass
def test_a_cancel_inside_an_iteration_stops_at_the_next_ddim_step(
    ctx,  # noqa: F811 - the fixture imported above
    sessions,
    session,
    tenant,
    model_cache,
    monkeypatch,
    cancel_at,
):
    # one iteration of 100 DDIM steps: 100 UNet calls forward, 100 more in the backward pass
    job = submit(session, tenant, {"classes": ["seven"],
                                   "guidance": {"iterations": 2, "ddim_steps": 100}})  # fmt: skip
    pulses: list[runner.Pulse] = []
    start = runner.Pulse.start

    def record_start(self: runner.Pulse) -> None:
        pulses.append(self)
        start(self)

    monkeypatch.setattr(runner.Pulse, "start", record_start)
    calls: list[int] = []

    def on_unet_call(*_: Any) -> None:
        calls.append(1)
        if len(calls) == cancel_at:  # the API cancels; the next heartbeat brings it
            with sessions() as other:
                assert repo.request_cancel(other, tenant_id=tenant.id, job_id=job.id)[1] == (
                    "canceling"
                )
                other.commit()
            pulses[0].beat()

    unet = model_cache.diffusion("digits", "cpu").unet
    handle = unet.register_forward_hook(on_unet_call)
    try:
        assert execute_job(job.id, ctx=ctx) == "canceled"
    finally:
        handle.remove()
    assert len(calls) == cancel_at  # not one UNet call after the heartbeat saw the cancel
    done = reload(sessions, job)
    assert (done.status, done.result, done.error) == ("canceled", None, None)
    assert done.progress["step"] == 0  # no iteration finished
    assert ctx.storage.list(folder(tenant, job)) == []
