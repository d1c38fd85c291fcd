"""Semantic checks on the zoo: explanations whose correct answer we know.

The jobs run through `digin.core.kinds.run_job` on the zoo's specs ('digits', 'digits:<name>'), the
same path as `digin run`. The verdicts are plain functions of the result images: the judge's
prediction, and `patch_present`.
"""

from __future__ import annotations

import torch

from digin.core.digits.data import PatchSpec, patch_present
from digin.core.digits.evaluate import predictions
from digin.core.jobs import JobResult


def judge_agreement(result: JobResult, judge) -> tuple[float, float]:
    """(guided, unguided): share of items whose image the judge assigns to the item's class,
    for the selected images and for iteration 0 (the plain sample)."""
    target = torch.tensor([it.class_index for it in result.items])
    start = result.guidance.trajectory[0].float() / 255  # (B, 3, H, W)
    guided = (predictions(judge, result.guidance.images) == target).float().mean()
    unguided = (predictions(judge, start) == target).float().mean()
    return float(guided), float(unguided)


def patch_rates(result: JobResult, spec: PatchSpec) -> tuple[float, float]:
    """(guided, unguided): share of the selected images / of iteration 0 with the patch."""
    start = result.guidance.trajectory[0].float() / 255
    guided = patch_present(result.guidance.images, spec).float().mean()
    return float(guided), float(patch_present(start, spec).float().mean())
