"""The official code's optimiser, loss and blending options (docs/architecture.md §3.6, §3.12,
§4.3, §5.6) on the tiny random Stable Diffusion models: gradient normalisation, early stopping,
the uniform loss-step schedule, separate per-step flags for ΔC and Δ∅, regularisers of the
text-to-image kinds, the `conf` and pure negative neuron losses, foreground blending of neuron
visualisations, and the counterfactual's joint prompt-to-prompt × blend search."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from digin.core.config import GuidanceConfig, RegularizerWeights
from digin.core.context import RunContext
from digin.core.counterfactual.attention import find_words, token_span
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.counterfactual.edit import schedule_candidates
from digin.core.counterfactual.job import run_counterfactual
from digin.core.foreground import class_tokens, foreground_blend
from digin.core.guidance import (
    Deltas,
    DenoisingLoop,
    descend,
    dpm_step,
    loss_step_weights,
    make_optimizer,
    optimize,
    steps_before,
)
from digin.core.jobs import ModelCache, run_generative
from digin.core.limits import estimate_cost
from digin.core.objectives import ClassObjective, NeuronObjective
from digin.core.params import ParamsError, validate_params
from digin.core.regularizers import Regularizers

RES = 32  # 32 px images (16 x 16 latents)
FAST = GuidanceConfig(ddim_steps=3, iterations=2, loss_steps=2, num_cutouts=2, lr=0.05)
FAST_PARAMS = {"ddim_steps": 3, "iterations": 2, "loss_steps": 2, "num_cutouts": 2, "lr": 0.05}
PROMPTS = ["a photograph of a tench", "a photograph of a goldfish"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture(scope="module")
def sd(tiny_models, cache):
    return cache.diffusion(tiny_models["sd"], "cpu")


@pytest.fixture(scope="module")
def clf(tiny_models, cache):
    return cache.classifier(tiny_models["classifier"], "cpu", "openai")


def _run(sd, objective, config=FAST, prompts=PROMPTS, **kw):
    cond, uncond = sd.encode_text(prompts), sd.null_text(len(prompts))
    seeds = list(range(len(prompts)))
    return optimize(sd, objective, cond=cond, uncond=uncond, seeds=seeds, config=config,
                    resolution=RES, **kw)  # fmt: skip


# --- the loss-step schedule, per-step flags, gradient normalisation, early stopping -----------


def test_the_uniform_schedule_weighs_every_loss_step_alike(sd, clf):
    assert loss_step_weights(3, "uniform").tolist() == pytest.approx([1 / 3] * 3)
    assert loss_step_weights(3).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    objective = ClassObjective(clf, torch.tensor([1, 2]))
    linear = _run(sd, objective, replace(FAST, iterations=1))
    uniform = _run(sd, objective, replace(FAST, iterations=1, loss_steps_schedule="uniform"))
    # the same chain and crops; only the weights of the two loss steps differ
    assert not torch.allclose(linear.train_loss, uniform.train_loss)
    torch.testing.assert_close(linear.clean_loss[0], uniform.clean_loss[0])
    with pytest.raises(ValueError, match="loss_steps_schedule"):
        loss_step_weights(2, "cosine")


def test_the_null_text_delta_can_be_shared_by_all_steps_apart_from_the_prompt_delta(sd, clf):
    config = GuidanceConfig(per_step_deltas=True, per_step_uncond_deltas=False)
    assert (
        config.uncond_per_step is False
        and GuidanceConfig(per_step_deltas=False).uncond_per_step is False
    )
    deltas = Deltas.zeros(sd.encode_text(PROMPTS), 3, 1)
    assert deltas.cond.shape[0] == 3 and deltas.uncond.shape[0] == 1
    deltas.uncond[0] += 1.0
    assert torch.equal(deltas.at(2)[1].hidden, deltas.uncond[0])  # the shared Δ∅ at every step
    objective = ClassObjective(clf, torch.tensor([1, 2]))
    lr = replace(FAST, lr=0.5, optimize_latents=False)
    both = _run(sd, objective, lr).clean_loss
    shared_uncond = _run(sd, objective, replace(lr, per_step_uncond_deltas=False)).clean_loss
    shared_all = _run(sd, objective, replace(lr, per_step_deltas=False)).clean_loss
    assert not torch.allclose(shared_uncond[-1], both[-1])
    assert not torch.allclose(shared_uncond[-1], shared_all[-1])


def test_normalised_gradients_give_every_item_a_step_of_the_learning_rate(sd):
    cond = sd.encode_text(PROMPTS)
    config = GuidanceConfig(optimizer="sgd", lr=0.1, optimize_latents=False, optimize_uncond=False,
                            per_step_deltas=False, normalize_gradients=True)  # fmt: skip
    z_T = torch.ones(2, 4, 4, 4)
    deltas = Deltas.zeros(cond, 1)
    optimizer, scheduler = make_optimizer(config, z_T, deltas)
    scale = torch.tensor([1.0, 1000.0]).view(1, 2, 1, 1)  # gradients 1000 times apart
    total = (deltas.cond * scale * torch.linspace(0, 1, deltas.cond[0, 0].numel()).view(
        deltas.cond.shape[2:])).flatten(2).sum(-1).sum(0)  # fmt: skip
    descend(total, optimizer, scheduler, z_T, torch.ones(2, 1, 1, 1), deltas, config)
    step = deltas.cond.detach().flatten(2).norm(dim=-1)[0]  # (B,) ‖ΔC_b‖ after one SGD step
    torch.testing.assert_close(step, torch.full((2,), 0.1))
    # without normalisation the steps are as far apart as the gradients
    plain = replace(config, normalize_gradients=False)
    deltas = Deltas.zeros(cond, 1)
    optimizer, scheduler = make_optimizer(plain, z_T, deltas)
    total = (deltas.cond * scale).flatten(2).sum(-1).sum(0)
    descend(total, optimizer, scheduler, z_T, torch.ones(2, 1, 1, 1), deltas, plain)
    norms = deltas.cond.detach().flatten(2).norm(dim=-1)[0]
    assert norms[1] / norms[0] == pytest.approx(1000.0, rel=1e-3)


def test_early_stopping_freezes_each_item_that_reaches_the_loss(sd, clf):
    objective = ClassObjective(clf, torch.tensor([1, 2]))
    config = replace(FAST, lr=0.5, iterations=3)
    plain = _run(sd, objective, config)
    first = plain.train_loss[0]  # (2,) the training losses of iteration 0
    assert first[0] != first[1]
    threshold = float(first.mean())  # one item is below it at once, the other not
    low = int(first.argmin())
    high = 1 - low
    early = _run(sd, objective, replace(config, early_stopping_loss=threshold))
    assert early.iterations_done == config.iterations  # the other item went on
    frames = early.trajectory[:, low]
    assert all(torch.equal(f, frames[0]) for f in frames)  # no step after iteration 0
    torch.testing.assert_close(early.clean_loss[:, high], plain.clean_loss[:, high])
    # every item below the loss: the run ends after the iteration that saw it
    done = _run(sd, objective, replace(config, early_stopping_loss=1e9))
    assert done.trajectory.shape[0] == 1 and done.train_loss.shape == (1, 2)
    assert not done.stopped


# --- losses: conf, the pure negative neuron objective ----------------------------------------


def test_the_conf_loss_is_minus_the_confidence(sd, clf):
    result = _run(sd, ClassObjective(clf, torch.tensor([1, 2]), "conf"))
    torch.testing.assert_close(result.clean_loss, -result.metrics["p"])
    with pytest.raises(ValueError, match="'ce' or 'conf'"):
        ClassObjective(clf, torch.tensor([1]), "hinge")  # type: ignore[arg-type]
    params = validate_params("guided", {"classes": [3], "loss": "conf"})
    assert params.loss == "conf"  # type: ignore[attr-defined]
    with pytest.raises(ParamsError, match="loss"):
        validate_params("guided", {"classes": [3], "loss": "hinge"})


def test_the_suppress_mode_minimises_the_activation(sd, clf):
    neurons = torch.tensor([20, 82])  # units active on these samples (others are 0 after ReLU)
    config = replace(FAST, lr=0.5)
    down = _run(sd, NeuronObjective(clf, neurons, "suppress"), config)
    torch.testing.assert_close(down.clean_loss, down.metrics["activation"])
    up = _run(sd, NeuronObjective(clf, neurons, "activate"), config)
    torch.testing.assert_close(down.clean_loss[0], -up.clean_loss[0])  # the same start
    assert (down.metrics["activation"][-1] < up.metrics["activation"][-1]).all()
    assert validate_params("neuron", {"neurons": [1], "mode": "suppress"}).mode == "suppress"  # type: ignore[attr-defined]


# --- regularisers of the text-to-image kinds --------------------------------------------------


def test_regularisers_hold_each_item_near_its_unoptimised_sample(sd, clf):
    objective = ClassObjective(clf, torch.tensor([1, 2]))
    config = replace(FAST, lr=0.5, iterations=3)
    free = _run(sd, objective, config)
    reg = Regularizers({"pixel_l2": 1e4, "latent_l2": 10.0})
    held = _run(sd, objective, config, regularizers=reg)
    # iteration 0 is the reference itself: distance 0, the same loss as without regularisers
    assert held.metrics["pixel_l2"][0].abs().max() < 1e-10
    torch.testing.assert_close(held.clean_loss[0], free.clean_loss[0])
    assert (held.metrics["pixel_l2"][1:] > 0).all()
    ce = -held.metrics["p"].log()
    weighted = 1e4 * held.metrics["pixel_l2"] + 10.0 * held.metrics["latent_l2"]
    torch.testing.assert_close(held.clean_loss, ce + weighted, rtol=1e-4, atol=1e-4)

    def moved(result):
        return (result.trajectory[-1].float() - result.trajectory[0].float()).abs().mean()

    assert moved(held) < moved(free)


def test_lpips_regulariser_with_a_random_backbone(sd, clf):
    lpips = pytest.importorskip("lpips")
    net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval().requires_grad_(False)
    reg = Regularizers({"lpips": 1.0}, lpips_model=net)
    result = _run(sd, ClassObjective(clf, torch.tensor([1, 2])), replace(FAST, lr=0.5),
                  regularizers=reg)  # fmt: skip
    assert result.metrics["lpips"][0].abs().max() < 1e-6
    assert (result.metrics["lpips"][-1] > 0).all()


def test_regulariser_params_of_a_job(tiny_models, cache):
    raw = {"diffusion": tiny_models["sd"], "classifier": tiny_models["classifier"],
           "resolution": RES, "classes": [1], "guidance": FAST_PARAMS,
           "regularizers": {"pixel_l1": 5.0}}  # fmt: skip
    params = validate_params("guided", raw)
    assert params.regularizers == RegularizerWeights(pixel_l1=5.0)  # type: ignore[attr-defined]
    result = run_generative(params, RunContext(seed=3, cache=cache))  # type: ignore[arg-type]
    assert "pixel_l1" in result.guidance.metrics
    with pytest.raises(ParamsError, match="regularizers.pixel_l1"):
        validate_params("guided", {**raw, "regularizers": {"pixel_l1": -1}})
    with pytest.raises(ParamsError, match="regularizers.tv"):
        validate_params("guided", {**raw, "regularizers": {"tv": 1}})
    with pytest.raises(ValueError, match="unknown regularisers"):
        Regularizers({"tv": 1.0})


# --- foreground blending of neuron visualisations -------------------------------------------


def test_the_foreground_blend_keeps_the_unoptimised_sample_under_the_class_mask(sd):
    cond = sd.encode_text(PROMPTS)
    loop = DenoisingLoop(sd, FAST, RES, sd.null_text(2))
    z_T = torch.randn(2, *sd.latent_shape(RES), generator=torch.Generator().manual_seed(0))
    template = "a photograph of a {class}"
    tokens = [class_tokens(sd.tokenizers[0], template, p) for p in PROMPTS]
    assert tokens[0] == token_span(sd.tokenizers[0], PROMPTS[0], find_words(PROMPTS[0], "tench"))
    blend = foreground_blend(loop, z_T, cond, tokens, 0.5)
    assert blend.templates.shape == (FAST.ddim_steps, 2, *z_T.shape[1:])
    torch.testing.assert_close(blend.templates[0], z_T)
    assert blend.mask.shape == (2, 1, *z_T.shape[2:])
    assert float(blend.mask.min()) >= 0 and float(blend.mask.amax()) == pytest.approx(1.0)
    assert blend.steps.tolist() == [steps_before(0.5, FAST.ddim_steps)] * 2
    # at a blended step, where the mask is 1 the latent becomes the template
    z = torch.zeros_like(z_T)
    out = blend(z, 0)
    full = blend.mask.expand_as(z) == 1
    torch.testing.assert_close(out[full], blend.templates[0][full])
    assert torch.equal(blend(z, FAST.ddim_steps - 1), z)  # past the blended steps
    with pytest.raises(ValueError, match="has no '{class}'"):
        class_tokens(sd.tokenizers[0], "a photograph", "a photograph")


def test_a_neuron_job_with_foreground_blending(tiny_models, cache):
    raw = {"diffusion": tiny_models["sd"], "classifier": tiny_models["classifier"],
           "resolution": RES, "neurons": [2, 4], "classes": ["tench"],
           "guidance": {**FAST_PARAMS, "lr": 0.5}}  # fmt: skip
    ctx = RunContext(seed=1, cache=cache)
    plain = run_generative(validate_params("neuron", raw), ctx).guidance  # type: ignore[arg-type]
    params = validate_params("neuron", {**raw, "foreground_blend": 0.5})
    kept = run_generative(params, ctx).guidance  # type: ignore[arg-type]
    # the same unoptimised sample (blending it with itself), then a different optimisation
    assert (kept.trajectory[0].int() - plain.trajectory[0].int()).abs().max() <= 1
    assert not torch.equal(kept.trajectory[-1], plain.trajectory[-1])
    with pytest.raises(ParamsError, match="foreground_blend needs classes"):
        validate_params("neuron", {"neurons": [1], "foreground_blend": 0.3})
    with pytest.raises(ParamsError, match="foreground_blend"):
        validate_params("neuron", {**raw, "foreground_blend": 1.5})
    cost = estimate_cost("neuron", params).value
    assert cost == 2 * (FAST.iterations + 2) * FAST.ddim_steps * RES**2  # + the mask's chain


# --- the counterfactual's joint prompt-to-prompt x blend search ------------------------------


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 5, 6, generator=gen)
    pixels = torch.nn.functional.interpolate(small, size=(40, 48), mode="bicubic").clamp(0, 1)
    path = tmp_path_factory.mktemp("images") / "start.png"
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


def test_the_schedule_candidates():
    cf = CounterfactualConfig(p2p_fractions=(0.3, 0.5), blend_fraction=0.3, blend_search=(0.0,))
    assert schedule_candidates(cf) == [(0.3, 0.3), (0.5, 0.3), (0.3, 0.0), (0.5, 0.0)]
    only = CounterfactualConfig(p2p_fractions=(), blend_search=())
    assert schedule_candidates(only) == [(0.0, 0.3)]
    with pytest.raises(ValueError, match="blend_search must be distinct"):
        CounterfactualConfig(blend_search=(0.0, 0.0))


def test_counterfactuals_search_prompt_to_prompt_and_blend_jointly(tiny_models, image_file, cache):
    raw = {"image": str(image_file), "diffusion": tiny_models["sd"],
           "classifier": tiny_models["classifier"], "resolution": RES, "start_class": "tench",
           "targets": [1, 2], "guidance": FAST_PARAMS,
           "counterfactual": {"p2p_fractions": [0.3, 0.6], "blend_fraction": 0.3,
                              "blend_search": [0.0, 0.7]}}  # fmt: skip
    params = validate_params("counterfactual", raw)
    result = run_counterfactual(params, RunContext(seed=2, cache=cache))  # type: ignore[arg-type]
    for item in result.items:
        assert set(item.p2p_search) == {"0.3", "0.6"}
        assert set(item.blend_search) == {"0.3", "0.0", "0.7"}
        best = min(item.p2p_search.values())
        assert min(item.blend_search.values()) == best
        # the chosen pair is the one of the lowest loss of the whole table
        assert item.p2p_search[str(item.p2p_fraction)] == best
        assert item.blend_search[str(item.blend_fraction)] == best
    summary = result.summary()["items"][0]
    assert {"blend_fraction", "blend_search"} <= set(summary)
    # the cost counts every pair of the search: 2 p2p x 3 blend fractions
    cost = estimate_cost("counterfactual", params)
    passes = FAST.iterations + 1 + 6
    assert f"{passes} passes" in cost.describe()


# --- the DPM-Solver++(2M) sampler -------------------------------------------------------------


def test_the_dpm_solver_is_ddim_at_first_order_and_second_order_after(sd, clf):
    objective = ClassObjective(clf, torch.tensor([1, 2]))
    one = replace(FAST, ddim_steps=1, loss_steps=1, iterations=0)
    # a single step is first order: the DDIM step
    torch.testing.assert_close(_run(sd, objective, replace(one, solver="dpm")).trajectory,
                               _run(sd, objective, one).trajectory, atol=1, rtol=0)  # fmt: skip
    plain = replace(FAST, ddim_steps=4, iterations=0)
    ddim = _run(sd, objective, plain).clean_loss
    dpm = _run(sd, objective, replace(plain, solver="dpm")).clean_loss
    assert not torch.allclose(ddim, dpm)  # steps 1 and 2 are second order
    # it optimises like DDIM does: through every step, with checkpointing or without
    config = replace(FAST, solver="dpm", lr=0.5, ddim_steps=4)
    with_ckpt = _run(sd, objective, config)
    without = _run(sd, objective, replace(config, checkpointing=False))
    torch.testing.assert_close(with_ckpt.clean_loss, without.clean_loss, rtol=1e-4, atol=1e-4)
    assert (with_ckpt.clean_loss[-1] < with_ckpt.clean_loss[0]).all()


def test_the_dpm_update_against_its_formula(sd):
    loop = DenoisingLoop(sd, replace(FAST, ddim_steps=4, solver="dpm"), RES, sd.null_text(1))
    tables = loop.dpm
    assert tables is not None and len(tables) == 4
    gen = torch.Generator().manual_seed(0)
    z, eps, prev = (torch.randn(1, 4, 2, 2, generator=gen) for _ in range(3))
    (a_p, s_p, _, _), (a_s, s_s, a_t, s_t) = tables[0], tables[1]
    x0 = (z - s_s * eps) / a_s
    lam_p, lam_s, lam_t = (torch.tensor(a / s).log() for a, s in ((a_p, s_p), (a_s, s_s),
                                                                   (a_t, s_t)))  # fmt: skip
    h, h0 = lam_t - lam_s, lam_s - lam_p
    d = (1 + h / (2 * h0)) * x0 - h / (2 * h0) * prev
    expected = (s_t / s_s) * z - a_t * (torch.exp(-h) - 1) * d
    got, got_x0 = dpm_step(tables, loop.scheduler.config, 1, z, eps, prev)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got, expected.float())
    with pytest.raises(ParamsError, match="solver must be 'ddim'"):
        validate_params("counterfactual", {"image": "digits:test/0", "targets": [1],
                                           "guidance": {"solver": "dpm"}})  # fmt: skip
