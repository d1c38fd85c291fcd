"""What a run needs besides its params: every kind's runner is `run(params, ctx) -> Result`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ProgressFn = Callable[[int, int, dict], None]  # (step, total, info)
StopFn = Callable[[], bool]  # polled between iterations: True stops the run
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
