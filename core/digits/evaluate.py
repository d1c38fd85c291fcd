"""Quality measures of the zoo (the zoo's bars), shared by the training command (model cards)
and `bench/zoo.py`. All take models through the project's interfaces (`Classifier`,
`DiffusionModel`), so they measure exactly what the loaders return.
"""

from __future__ import annotations

import torch
from torch import Tensor

from digin.core.classifiers import Classifier
from digin.core.config import GuidanceConfig
from digin.core.diffusion import DiffusionModel
from digin.core.digits.data import CLASS_NAMES, NUM_CLASSES, PatchSpec, patch_present, plant_patch
from digin.core.digits.settings import CLASS_PROMPT, SAMPLE_GUIDANCE_SCALE, SAMPLE_STEPS


def rgb(x: Tensor) -> Tensor:
    """(N, 1, H, W) grey → (N, 3, H, W), the classifiers' input format."""
    return x.expand(-1, 3, -1, -1)


@torch.no_grad()
def predictions(clf: Classifier, images: Tensor, batch_size: int = 512) -> Tensor:
    """(N, 1 or 3, 16, 16) in [0, 1] → predicted classes (N,)."""
    device = next(clf.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        out.append(clf(rgb(x) if x.shape[1] == 1 else x).argmax(1).cpu())
    return torch.cat(out)


def accuracy(clf: Classifier, images: Tensor, labels: Tensor) -> float:
    return float((predictions(clf, images) == labels).float().mean())


def spurious_rates(
    clf: Classifier, images: Tensor, labels: Tensor, spec: PatchSpec, target: int
) -> dict[str, float]:
    """Clean accuracy, and how often patched digits are predicted as `target`: for digits of
    the other classes (the shortcut) and, for reference, the target class itself."""
    others = labels != target
    patched = plant_patch(images, spec)
    pred = predictions(clf, patched)
    return {
        "clean_accuracy": accuracy(clf, images, labels),
        "patched_others_to_target": float((pred[others] == target).float().mean()),
        "patched_target_accuracy": float((pred[~others] == target).float().mean()),
        "patched_others_accuracy": float((pred[others] == labels[others]).float().mean()),
    }


@torch.no_grad()
def patch_unit(clf: Classifier, images: Tensor, labels: Tensor, spec: PatchSpec, target: int):
    """The penultimate unit that carries the patch to class `target`: the largest mean
    contribution a_n · w_target,n to the target logit on patched digits of the other classes.
    Returns (unit, contributions (F,))."""
    x = rgb(plant_patch(images[labels != target], spec))
    _, feats = clf.forward_features(x.to(next(clf.parameters()).device))  # (N, F)
    contrib = (feats * clf.last_layer_weight[target]).mean(0).cpu()  # (F,)
    return int(contrib.argmax()), contrib


@torch.no_grad()
def sample_images(
    model: DiffusionModel,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = SAMPLE_STEPS,
    guidance_scale: float = SAMPLE_GUIDANCE_SCALE,
    batch_size: int = 100,
) -> Tensor:
    """Plain DDIM + CFG samples, one per (prompt, seed): (N, 3, 16, 16) in [0, 1] on the CPU."""
    from digin.core.augment import ItemRNG
    from digin.core.guidance import initial_latents, sample

    config = GuidanceConfig(ddim_steps=steps, guidance_scale=guidance_scale, loss_steps=1)
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
        rngs = [ItemRNG.from_seed(seed, "cpu") for seed in s]
        z = initial_latents(model, rngs, model.resolution)
        cond, uncond = model.encode_text(p), model.null_text(len(p))
        out.append(sample(model, cond=cond, uncond=uncond, latents=z, config=config).cpu())
    return torch.cat(out)


def generator_quality(
    model: DiffusionModel,
    judge: Classifier,
    spec: PatchSpec,
    *,
    per_class: int = 20,
    seed: int = 10_000,
    steps: int = SAMPLE_STEPS,
    guidance_scale: float = SAMPLE_GUIDANCE_SCALE,
) -> dict:
    """Class-conditional samples, `per_class` per class and prompt form (word "seven" and
    numeral "7"): how often the judge recognises the prompted digit, and the share of samples
    with the patch."""
    result: dict = {"per_class": per_class, "ddim_steps": steps, "guidance_scale": guidance_scale}
    for form in ("word", "numeral"):
        prompts, labels = [], []
        for k in range(NUM_CLASSES):
            name = CLASS_NAMES[k] if form == "word" else str(k)
            prompts += [CLASS_PROMPT.replace("{class}", name)] * per_class
            labels += [k] * per_class
        seeds = [seed + i for i in range(len(prompts))]
        images = sample_images(model, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
        labels_t = torch.tensor(labels)
        hit = predictions(judge, images) == labels_t
        result[form] = {
            "judge_accuracy": float(hit.float().mean()),
            "judge_accuracy_per_class": [
                float(hit[labels_t == k].float().mean()) for k in range(NUM_CLASSES)
            ],
            "patch_rate": float(patch_present(images, spec).float().mean()),
        }
    result["judge_accuracy"] = (
        result["word"]["judge_accuracy"] + result["numeral"]["judge_accuracy"]
    ) / 2
    result["patch_rate"] = (result["word"]["patch_rate"] + result["numeral"]["patch_rate"]) / 2
    return result
