"""Invariants of the guidance loop (docs/architecture.md §3, §11) on tiny random Stable
Diffusion components."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from digin.core.augment import ItemRNG, apply_cutouts, clean_view, sample_cutouts
from digin.core.config import GuidanceConfig
from digin.core.guidance import initial_latents, loss_step_weights, optimize, sample
from digin.core.loaders import load_classifier, load_diffusion
from digin.core.objectives import ClassObjective, DisagreementObjective, NeuronObjective, margin

RES = 32  # 32 px images (16 x 16 latents): fast on two CPU cores
FAST = GuidanceConfig(ddim_steps=4, iterations=3, loss_steps=3, num_cutouts=4, lr=0.05)


@pytest.fixture(scope="module")
def sd(tiny_models):
    return load_diffusion(tiny_models["sd"])


@pytest.fixture(scope="module")
def clf(tiny_models):
    return load_classifier(tiny_models["classifier"])


@pytest.fixture(scope="module")
def clip(tiny_models):
    return load_classifier(tiny_models["open_clip"], clip_templates="simple")


def run(sd, objective, prompts, seeds, config=FAST, **kw):
    return optimize(
        sd,
        objective,
        cond=sd.encode_text(prompts),
        uncond=sd.null_text(len(prompts)),
        seeds=seeds,
        config=config,
        resolution=RES,
        **kw,
    )


def test_trajectory_starts_with_the_unoptimised_sample(sd, clf):
    result = run(sd, ClassObjective(clf, torch.tensor([1])), ["a photograph of a tench"], [0])
    assert result.trajectory.shape == (FAST.iterations + 1, 1, 3, RES, RES)
    assert result.clean_loss.shape == (FAST.iterations + 1, 1)
    assert result.train_loss.shape == (FAST.iterations, 1)
    z = initial_latents(sd, [ItemRNG.from_seed(0, "cpu")], RES)
    plain = sample(
        sd,
        cond=sd.encode_text(["a photograph of a tench"]),
        uncond=sd.null_text(1),
        latents=z,
        config=FAST,
        resolution=RES,
    )
    plain_u8 = (plain * 255).round().to(torch.uint8)
    assert torch.equal(result.trajectory[0], plain_u8)
    assert not torch.equal(result.trajectory[-1], result.trajectory[0])  # it did optimise


def test_latent_norm_is_kept_after_every_step(sd, clf):
    config = replace(FAST, lr=0.5, latent_lr_factor=1.0)  # large steps on z_T
    result = run(sd, ClassObjective(clf, torch.tensor([1, 2])), ["a", "b"], [0, 1], config)
    torch.testing.assert_close(result.latent_norms, result.latent_norms[:1].expand(4, 2))
    assert not torch.allclose(
        result.final_latents,
        initial_latents(sd, [ItemRNG.from_seed(s, "cpu") for s in (0, 1)], RES),
    )


def test_zero_learning_rate_reproduces_plain_ddim(sd, clf):
    config = replace(FAST, lr=0.0)
    prompts = ["a photograph of a goldfish"]
    result = run(sd, ClassObjective(clf, torch.tensor([1])), prompts, [3], config)
    z = initial_latents(sd, [ItemRNG.from_seed(3, "cpu")], RES)
    plain = sample(
        sd,
        cond=sd.encode_text(prompts),
        uncond=sd.null_text(1),
        latents=z,
        config=config,
        resolution=RES,
    )
    torch.testing.assert_close(result.images, plain, atol=1e-5, rtol=0)
    for it in range(config.iterations + 1):
        assert torch.equal(result.trajectory[it], result.trajectory[0])


def test_checkpointing_changes_neither_values_nor_gradients(sd, clf):
    # SGD: the first step is lr * gradient, so equal updates mean equal gradients
    config = replace(FAST, iterations=1, optimizer="sgd", lr=10.0, latent_lr_factor=1.0)
    obj = ClassObjective(clf, torch.tensor([4]))
    with_ckpt = run(sd, obj, ["a"], [5], config)
    without = run(sd, obj, ["a"], [5], replace(config, checkpointing=False))
    torch.testing.assert_close(with_ckpt.train_loss, without.train_loss)
    torch.testing.assert_close(with_ckpt.final_latents, without.final_latents, atol=1e-5, rtol=1e-4)
    z0 = initial_latents(sd, [ItemRNG.from_seed(5, "cpu")], RES).cpu()
    assert (with_ckpt.final_latents - z0).abs().max() > 1e-4  # the gradient was not zero


def test_loss_step_weights():
    torch.testing.assert_close(loss_step_weights(3), torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    assert loss_step_weights(1).tolist() == [1.0]


def test_cutout_sizes_and_clean_path():
    images = torch.rand(2, 3, 64, 64)
    rngs = [ItemRNG.from_seed(s, "cpu") for s in (0, 1)]
    plan = sample_cutouts(rngs, image_side=64, size=24, num=50, cut_power=0.3, noise_sd=0.0)
    sides = [s for item in plan.boxes for _, _, s in item]
    assert all(24 <= s <= 64 for s in sides)
    assert sum(s > 44 for s in sides) > len(sides) / 2  # biased to large crops
    assert all(t + s <= 64 and left + s <= 64 for item in plan.boxes for t, left, s in item)
    views = apply_cutouts(images, plan)
    assert views.shape == (2, 50, 3, 24, 24)
    # a full-image crop is the plain resize; the clean path is only a resize
    full = torch.nn.functional.adaptive_avg_pool2d(images, 24)
    for b, item in enumerate(plan.boxes):
        for j, (_, _, s) in enumerate(item):
            if s == 64:
                torch.testing.assert_close(views[b, j], full[b])
    clean = clean_view(images, 24)
    expected = torch.nn.functional.interpolate(images, size=24, mode="bilinear", antialias=True)
    torch.testing.assert_close(clean[:, 0], expected)
    assert torch.equal(clean_view(images, 64)[:, 0], images)
    noisy = sample_cutouts(rngs, image_side=64, size=24, num=8, cut_power=0.3, noise_sd=0.005)
    assert 0.003 < float(noisy.noise.std()) < 0.007


def test_margin_is_against_the_largest_other_logit():
    logits = torch.tensor([[[3.0, 1.0, 2.0]], [[0.0, 5.0, 4.0]]])  # (B=2, n=1, K=3)
    assert margin(logits, torch.tensor([0, 2])).flatten().tolist() == [1.0, -1.0]


def _objectives(clf, clip):
    y = torch.tensor([1, 2])
    yield "guided", ClassObjective(clf, y)
    for loss in ("conf", "log_conf", "logits"):
        yield f"disagreement-{loss}", DisagreementObjective(clf, clip, y, loss)
    # units that are active on images at all (a ReLU unit at zero has no gradient)
    _, feats = clf.forward_features(torch.rand(8, 3, clf.input_size, clf.input_size))
    units = feats.mean(0).topk(2).indices
    yield "neuron-activate", NeuronObjective(clf, units, "activate")
    for mode in ("activate_keep_class", "suppress_keep_class"):
        yield f"neuron-{mode}", NeuronObjective(clf, units, mode, y)


def test_loss_decreases_for_every_kind(sd, clf, clip):
    config = replace(FAST, iterations=4, num_cutouts=2, lr=0.1)
    for name, objective in _objectives(clf, clip):
        result = run(sd, objective, ["a photograph of a tench", "a goldfish"], [0, 1], config)
        first, last = result.clean_loss[0], result.clean_loss[-1]
        assert (last < first).all(), f"{name}: clean loss {first.tolist()} -> {last.tolist()}"


def test_same_seed_same_images(sd, clf):
    obj = ClassObjective(clf, torch.tensor([1]))
    a = run(sd, obj, ["a tench"], [11])
    b = run(sd, obj, ["a tench"], [11])
    c = run(sd, obj, ["a tench"], [12])
    assert torch.equal(a.trajectory, b.trajectory)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.trajectory[0], c.trajectory[0])


def test_batched_items_equal_single_runs(sd, clf):
    prompts, seeds, targets = ["a tench", "a goldfish", "a shark"], [7, 8, 9], [0, 1, 2]
    batched = run(sd, ClassObjective(clf, torch.tensor(targets)), prompts, seeds)
    for b in range(3):
        single = run(
            sd,
            ClassObjective(clf, torch.tensor(targets[b : b + 1])),
            prompts[b : b + 1],
            seeds[b : b + 1],
        )
        torch.testing.assert_close(
            batched.clean_loss[:, b], single.clean_loss[:, 0], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(batched.images[b], single.images[0], atol=2e-4, rtol=0)
        assert batched.best_iteration[b] == single.best_iteration[0]


def test_bf16_autocast_runs_and_stays_close(sd, clf):
    obj = ClassObjective(clf, torch.tensor([1]))
    fp32 = run(sd, obj, ["a tench"], [0], replace(FAST, iterations=0))
    bf16 = run(sd, obj, ["a tench"], [0], replace(FAST, iterations=1, precision="bf16"))
    assert torch.isfinite(bf16.clean_loss).all()
    assert (bf16.trajectory[0].float() - fp32.trajectory[0].float()).abs().mean() < 8


def test_progress_and_cooperative_stop(sd, clf):
    calls = []
    result = run(
        sd,
        ClassObjective(clf, torch.tensor([1])),
        ["a"],
        [0],
        replace(FAST, iterations=5),
        progress=lambda step, total, info: calls.append((step, total)),
        should_stop=lambda: len(calls) >= 2,
    )
    assert calls == [(1, 6), (2, 6)]
    assert result.stopped and result.iterations_done == 2
    assert result.trajectory.shape[0] == 2
