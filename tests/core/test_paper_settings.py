"""The paper's official class names and noise bank as options (`class_names`, `latents`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from digin.core.classes import imagenet_class_names, official_class_names, prompt_class_names
from digin.core.jobs import ModelCache, expand_items
from digin.core.kinds import run_job
from digin.core.noisebank import official_latents
from digin.core.params import validate_params

OURS = imagenet_class_names()


def official_bank(shape: tuple[int, ...], per_row: int = 50) -> torch.Tensor:
    """The official script's recipe, literally: the global generator seeded with 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.randn((1000, per_row) + shape, dtype=torch.float)


def test_the_official_names_are_the_first_wordnet_lemmas_and_363_differ_from_ours():
    names = official_class_names()
    assert len(names) == 1000
    assert sum(a != b for a, b in zip(names, OURS, strict=True)) == 363
    assert (names[4], OURS[4]) == ("hammerhead", "hammerhead shark")
    assert (names[21], OURS[21]) == ("kite", "kite (bird of prey)")
    assert (names[7], OURS[7]) == ("cock", "rooster")
    assert names[134] == names[517] == "crane"  # the bird and the machine: one name
    assert names[638] == names[639] == "maillot"
    assert len(set(OURS)) == 1000 - 2  # ours repeat two names too ('missile', 'sunglasses')


def test_prompt_names_follow_the_choice_and_official_needs_imagenet():
    assert prompt_class_names(OURS, "ours") == OURS
    assert prompt_class_names(OURS, "official") == official_class_names()
    digits = [str(k) for k in range(10)]
    assert prompt_class_names(digits, "ours") == digits
    with pytest.raises(ValueError, match="ImageNet-1k classes only"):
        prompt_class_names(digits, "official")


def test_official_names_change_the_prompt_and_nothing_else():
    classifier = SimpleNamespace(class_names=OURS)
    for choice, prompt in (("ours", "hammerhead shark"), ("official", "hammerhead")):
        raw = {"classes": [4, "kite (bird of prey)"], "diffusion": "diffusers:x/y"}
        params = validate_params("guided", {**raw, "class_names": choice})
        items = expand_items(params, classifier, seed=0)  # type: ignore[arg-type]
        assert items[0].prompt == f"a photograph of a {prompt}"
        assert items[1].prompt.endswith("kite" if choice == "official" else "(bird of prey)")
        assert [it.class_name for it in items] == ["hammerhead shark", "kite (bird of prey)"]


@pytest.mark.parametrize(
    ("shape", "per_class"),
    [((4, 2, 4), 1), ((3, 1, 1), 2), ((4, 2, 2), 60)],  # rows of 1600, 150 (not 16k), 60 x 16
)
def test_the_official_bank_is_the_official_recipe_bit_for_bit(shape, per_class):
    bank = official_bank(shape, max(per_class, 50))
    classes, images = [999, 3, 3, 0, 517], [0, 1, 0, per_class - 1, 0]
    z = official_latents(shape, classes, images, per_class)
    assert z.dtype == torch.float32 and z.shape == (5, *shape)
    for b, (k, j) in enumerate(zip(classes, images, strict=True)):
        assert torch.equal(z[b], bank[k, j])
    again = official_latents(shape, [2, 998], [0, 0], per_class)  # from the kept row states
    assert torch.equal(again[0], bank[2, 0]) and torch.equal(again[1], bank[998, 0])
    with pytest.raises(ValueError, match="1000 rows"):
        official_latents(shape, [1000], [0], per_class)


def test_official_latents_start_every_seed_from_the_bank():
    """guided on the digits zoo, no optimiser steps: z_T is the final latent, whatever the
    seed (ours draws item i's from seed + i, tests/core/test_guidance.py)."""
    cache = ModelCache()
    raw = {"classes": [3, 7], "images_per_class": 2, "latents": "official",
           "guidance": {"iterations": 0, "ddim_steps": 2, "loss_steps": 1}}  # fmt: skip
    runs = [run_job("guided", raw, seed=seed, cache=cache) for seed in (0, 5)]
    official = runs[0].guidance.final_latents
    bank = official_latents((1, 16, 16), [3, 3, 7, 7], [0, 1, 0, 1], 2)  # grey 16 px digits
    assert torch.equal(official, bank)  # DDIM's init_noise_sigma is 1
    assert torch.equal(runs[1].guidance.final_latents, bank)
    assert torch.equal(runs[0].guidance.trajectory, runs[1].guidance.trajectory)
    items = runs[0].summary()["items"]
    assert [it["image_index"] for it in items] == [0, 1, 0, 1]
    assert [it["seed"] for it in items] == [0, 1, 2, 3]  # the crops' streams still follow it


def test_official_latents_need_a_class_per_item():
    with pytest.raises(ValueError, match="have no class"):
        run_job("neuron", {"neurons": [1], "latents": "official", "guidance": {"iterations": 0}})


def test_counterfactual_official_names_and_wordnet_targets(tiny_models, tmp_path):
    from PIL import Image

    path = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (90, 120, 150)).save(path)
    params = {
        "image": str(path),
        "diffusion": tiny_models["sd"],
        "classifier": tiny_models["open_clip"],  # zero-shot: the 1000 ImageNet classes
        "clip_templates": "simple",
        "resolution": 32,
        "start_class": "hammerhead shark",
        "targets": "wordnet",
        "class_names": "official",
        "guidance": {"ddim_steps": 2, "iterations": 0, "loss_steps": 1, "num_cutouts": 1},
        "counterfactual": {"null_text_steps": 0, "p2p_fractions": [0.5]},
    }
    result = run_job("counterfactual", params, cache=ModelCache())
    assert result.caption == "a photograph of a hammerhead"
    assert [it.target_index for it in result.items] == [2, 3]  # the other sharks
    assert [it.prompt for it in result.items] == [
        "a photograph of a great white shark",
        "a photograph of a tiger shark",
    ]
