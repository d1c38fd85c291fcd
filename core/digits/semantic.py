"""Semantic checks on the zoo: explanations whose correct answer we know (issue 3).

The jobs run through `core.jobs.run_job` with a `ZooCache`, which loads the zoo's specs with the
digits loaders, so they exercise the same path as `digin run`. The verdicts
are plain functions of the result images: the judge's prediction, and `patch_present`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.classifiers import Classifier
from core.diffusion import DiffusionModel
from core.digits.data import PatchSpec, patch_present
from core.digits.evaluate import predictions
from core.digits.zoo import DIFFUSION_NAME, load_digits_classifier, load_digits_diffusion
from core.jobs import JobResult, ModelCache


class ZooCache(ModelCache):
    """A `ModelCache` that loads the specs 'digits' and 'digits:<name>' from one zoo folder
    (default: $DIGIN_ZOO_DIR or the shipped core/zoo) and everything else as usual."""

    def __init__(self, zoo_dir: Path | str | None = None) -> None:
        super().__init__()
        self.zoo_dir = zoo_dir

    def diffusion(self, spec: str, device: str, *args, **kwargs) -> DiffusionModel:
        if spec != DIFFUSION_NAME:
            return super().diffusion(spec, device, *args, **kwargs)
        key = ("digits", spec, device)
        return self.get(key, lambda: load_digits_diffusion(device=device, zoo_dir=self.zoo_dir))

    def classifier(self, spec: str, device: str, *args, **kwargs) -> Classifier:
        scheme, _, name = spec.partition(":")
        if scheme != "digits":
            return super().classifier(spec, device, *args, **kwargs)
        key = ("digits", spec, device)
        return self.get(
            key, lambda: load_digits_classifier(name, device=device, zoo_dir=self.zoo_dir)
        )


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
