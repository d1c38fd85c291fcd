"""What a run needs besides its params: every kind's runner is `run(params, ctx) -> Result`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ProgressFn = Callable[[int, int, dict], None]  # (step, total, info)
StopFn = Callable[[], bool]  # polled between DDIM steps and mini-batches: True stops the run
ImageResolver = Callable[[str], bytes]  # an uploaded image's id → the file's bytes


@dataclass(frozen=True)
class RunContext:
    seed: int = 0  # item i is seeded with seed + i
    device: str = "cpu"
    cache: Any = None  # a digin.core.jobs.ModelCache (models loaded once per process); None: shared
    max_batch: int = 8  # items per optimisation run (a job's own max_batch may lower it)
    progress: ProgressFn | None = None
    should_stop: StopFn | None = None  # cancellation
    image_resolver: ImageResolver | None = None  # the service's uploads; None: ids are errors


class Stopped(Exception):
    """`should_stop()` said stop before the run had anything to show (inside the first
    iteration of its first batch, during an inversion, between an analysis's mini-batches): the
    run has no result. A stop later ends the run with the iterations and batches done so far."""


def check_stop(should_stop: StopFn | None) -> None:
    """Raise Stopped when `should_stop` says stop."""
    if should_stop is not None and should_stop():
        raise Stopped
