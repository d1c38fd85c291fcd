"""How many items run together in one optimisation.

The core's batch dimension B runs B independent items in one DDIM chain (same images as B single
runs). Bigger B is faster per item until the device's memory is full. Peak memory is close to
linear in B: the models and one step's workspace (`fixed`), plus per item its checkpointed step
inputs and one step's activations during recompute (`per_item`). `fit_memory_line` finds the two
from peaks measured at two batch sizes, `largest_batch` the largest B under a budget; `job_batch`
is the limit a job runs under (the runner's, capped by the job's own `max_batch`, e.g. 1 for the
`reference` preset).
"""

from __future__ import annotations

from dataclasses import dataclass

from digin.core.config import GuidanceConfig


def job_batch(runner_limit: int, config: GuidanceConfig) -> int:
    """Items per run: the runner's limit (worker setting, `--max-batch`, or a memory fit), capped
    by the job's `max_batch` when it sets one."""
    if runner_limit < 1:
        raise ValueError(f"max_batch must be at least 1, got {runner_limit}")
    return runner_limit if config.max_batch is None else min(runner_limit, config.max_batch)


@dataclass(frozen=True)
class MemoryLine:
    """Peak memory of one run as a function of B: fixed_bytes + B * per_item_bytes."""

    fixed_bytes: float
    per_item_bytes: float

    def peak(self, batch: int) -> float:
        return self.fixed_bytes + batch * self.per_item_bytes


def fit_memory_line(peaks: dict[int, float]) -> MemoryLine:
    """The line through measured peaks {B: bytes} at two or more batch sizes (least squares)."""
    if len(peaks) < 2:
        raise ValueError(f"need peaks at two batch sizes at least, got {sorted(peaks)}")
    xs, ys = list(peaks), [float(v) for v in peaks.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope /= sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 0.0)  # a noisy measurement never makes items free or negative
    return MemoryLine(fixed_bytes=my - slope * mx, per_item_bytes=slope)


def largest_batch(line: MemoryLine, budget_bytes: float, *, limit: int = 64) -> int:
    """The largest B in [1, limit] whose predicted peak fits `budget_bytes`; 0 when not even one
    item fits (the caller reports that, rather than running out of memory)."""
    if line.per_item_bytes <= 0:
        return limit if line.peak(1) <= budget_bytes else 0
    fits = int((budget_bytes - line.fixed_bytes) // line.per_item_bytes)
    return max(0, min(limit, fits))
