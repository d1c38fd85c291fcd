"""Cancellation inside a long iteration (docs/architecture.md §8.7): the engine polls
`should_stop` at every DDIM step, in the forward chain and in the recompute of the backward
pass; the analysis kinds between mini-batches. Counted in UNet calls and polls, never in time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from digin.core.context import Stopped
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job

STEPS = 100  # DDIM steps: one iteration is 100 UNet calls forward and 100 in its backward


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    torch.set_num_threads(1)
    return ModelCache()


class UNetCalls:
    """Counts the digits model's UNet calls (a forward hook), and their batch sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, _module: Any, args: tuple, _output: Any) -> None:
        self.sizes.append(int(args[0].shape[0]))

    @property
    def count(self) -> int:
        return len(self.sizes)


@pytest.fixture
def unet_calls(cache: ModelCache) -> Iterator[UNetCalls]:
    calls = UNetCalls()
    handle = cache.diffusion("digits", "cpu").unet.register_forward_hook(calls)
    try:
        yield calls
    finally:
        handle.remove()


def guided(iterations: int, checkpointing: bool = True, **extra: Any) -> dict[str, Any]:
    guidance = {"iterations": iterations, "ddim_steps": STEPS, "loss_steps": 1,
                "checkpointing": checkpointing}  # fmt: skip
    return {"classes": [3], "guidance": guidance, **extra}


@pytest.mark.parametrize(
    ("stop_at", "where"),
    [(30, "the first iteration's chain"), (150, "the backward pass of the first iteration")],
)
def test_a_stop_inside_the_first_iteration_ends_the_run_at_once(cache, unet_calls, stop_at, where):
    with pytest.raises(Stopped):
        run_job("guided", guided(3), cache=cache, should_stop=lambda: unet_calls.count >= stop_at)
    assert unet_calls.count == stop_at, where  # not one UNet call after the stop


def test_without_checkpointing_the_backward_pass_polls_at_every_step(cache, unet_calls):
    """No recompute in backward: a gradient hook on each step's latent polls instead."""
    polls = Polls(at=STEPS + 50)  # 100 polls in the chain, then 50 steps into the backward
    with pytest.raises(Stopped):
        run_job("guided", guided(3, checkpointing=False), cache=cache, should_stop=polls)
    assert polls.calls == STEPS + 50 and unet_calls.count == STEPS


def test_a_stop_inside_a_later_iteration_keeps_the_iterations_done(cache, unet_calls):
    stop_at = 2 * STEPS + 40  # iteration 0 done (chain + backward), inside iteration 1's chain
    result = run_job("guided", guided(3), cache=cache,
                     should_stop=lambda: unet_calls.count >= stop_at)  # fmt: skip
    assert unet_calls.count == stop_at
    g = result.guidance
    assert g.stopped and g.iterations_done == 1 and g.trajectory.shape[0] == 1
    assert result.summary()["stopped"] is True


def test_a_stop_inside_a_later_batch_keeps_the_batches_done(cache, unet_calls):
    # two items, one per batch; a batch: iteration 0 (chain + backward) and the evaluation
    per_batch = 3 * STEPS
    stop_at = per_batch + 10  # inside batch 2's first chain
    result = run_job("guided", guided(1, images_per_class=2), cache=cache, max_batch=1,
                     should_stop=lambda: unet_calls.count >= stop_at)  # fmt: skip
    assert unet_calls.count == stop_at
    assert [it.index for it in result.items] == [0] and result.guidance.images.shape[0] == 1


def test_a_counterfactual_stops_inside_its_edits(cache, unet_calls):
    """Two targets: the edit calls the UNet on a CFG batch of 4 (the inversion on 1 or 2)."""
    params = {"image": "digits:test/0", "targets": [1, 2], "guidance": {"ddim_steps": 20}}

    def should_stop() -> bool:
        return unet_calls.sizes.count(4) >= 3  # inside the first edit chain

    result = run_job("counterfactual", params, cache=cache, should_stop=should_stop)
    assert unet_calls.sizes.count(4) == 3
    assert result.stopped and result.items == [] and result.guidance is None
    assert result.summary()["stopped"] is True


class Polls:
    """A should_stop that says stop from its `at`-th call on, counting its calls."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.at


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("neural_pca", {"class": 3, "images": {"digits": "train", "labels": "all"}}),
        ("spurious_score", {"classes": [1, 7], "spurious": {"digits": "train", "labels": "all"}}),
    ],
)
def test_the_analysis_kinds_stop_between_mini_batches(cache, kind, params):
    """Over a thousand images in mini-batches of 256: the second poll stops the run."""
    polls = Polls(at=2)
    with pytest.raises(Stopped):
        run_job(kind, params, cache=cache, should_stop=polls)
    assert polls.calls == 2
