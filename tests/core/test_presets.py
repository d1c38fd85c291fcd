"""Speed settings of a job: the `reference` and `optimised` presets, batch limits and
the memory fit (digin.core.config, digin.core.params, digin.core.batching), and that channels-last,
the device-side timesteps and the single host copy per iteration leave the results as they were."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from digin.core.batching import fit_memory_line, job_batch, largest_batch
from digin.core.config import PRESETS, GuidanceConfig
from digin.core.digits.settings import DIGITS_GUIDANCE
from digin.core.params import ParamsError, validate_params

SD = "diffusers:/models/sd15"  # validation only: nothing is loaded


def test_the_default_config_is_unchanged_and_has_no_preset():
    cfg = GuidanceConfig()
    assert (cfg.precision, cfg.checkpointing, cfg.num_cutouts) == ("fp32", True, 16)
    assert (cfg.channels_last, cfg.compile_unet, cfg.max_batch, cfg.preset) == (
        False, False, None, None,
    )  # fmt: skip


def test_the_reference_preset_is_the_papers_configuration():
    cfg = GuidanceConfig.from_preset("reference")
    assert (cfg.precision, cfg.max_batch, cfg.num_cutouts) == ("fp32", 1, 16)
    assert cfg.checkpointing
    assert cfg.preset == "reference"


def test_the_optimised_preset_changes_numerics_not_the_algorithm():
    cfg = GuidanceConfig.from_preset("optimised", iterations=5)
    assert (cfg.precision, cfg.max_batch, cfg.iterations) == ("bf16", None, 5)
    assert cfg.weights_precision == "bf16" and cfg.checkpoint_decoder_blocks
    same = {k: v for k, v in asdict(cfg).items() if k not in PRESETS["optimised"]}
    default = {k: v for k, v in asdict(GuidanceConfig(iterations=5)).items() if k in same}
    assert same == {**default, "preset": "optimised"}


def test_job_params_name_a_preset_and_override_its_fields():
    params = validate_params(
        "guided", {"diffusion": SD, "classes": [1], "guidance": {"preset": "optimised"}}
    )
    assert params.guidance.precision == "bf16" and params.guidance.preset == "optimised"
    given = {"preset": "optimised", "precision": "fp32", "channels_last": True}
    params = validate_params("guided", {"diffusion": SD, "classes": [1], "guidance": given})
    assert (params.guidance.precision, params.guidance.channels_last) == ("fp32", True)
    # the stored params validate again to the same settings
    again = validate_params("guided", params.model_dump(mode="json"))
    assert again.guidance == params.guidance


def test_on_the_digits_zoo_a_preset_sits_between_the_zoo_settings_and_the_given_fields():
    raw = {"classes": [1], "guidance": {"preset": "reference", "iterations": 2}}
    cfg = validate_params("guided", raw).guidance
    assert cfg.ddim_steps == DIGITS_GUIDANCE.ddim_steps  # the zoo's algorithm settings
    assert (cfg.max_batch, cfg.precision, cfg.iterations) == (1, "fp32", 2)
    cf = validate_params(
        "counterfactual",
        {"image": "digits:test/0", "targets": [3], "guidance": {"preset": "optimised"}},
    ).guidance
    assert cf.precision == "bf16" and cf.preset == "optimised"


def test_an_unknown_preset_is_refused_naming_the_field():
    with pytest.raises(ParamsError) as err:
        validate_params("guided", {"diffusion": SD, "classes": [1], "guidance": {"preset": "x"}})
    assert any(e["field"] == "guidance.preset" for e in err.value.errors)
    with pytest.raises(ParamsError, match="max_batch"):
        validate_params("guided", {"diffusion": SD, "classes": [1], "guidance": {"max_batch": 0}})


def test_the_job_batch_is_the_runners_capped_by_the_jobs():
    assert job_batch(8, GuidanceConfig()) == 8
    assert job_batch(8, GuidanceConfig.from_preset("reference")) == 1
    assert job_batch(2, GuidanceConfig(max_batch=4)) == 2
    with pytest.raises(ValueError, match="at least 1"):
        job_batch(0, GuidanceConfig())


def test_the_largest_batch_under_a_memory_budget():
    line = fit_memory_line({1: 10.0, 2: 14.0, 4: 22.0})  # 6 fixed + 4 per item
    assert (line.fixed_bytes, line.per_item_bytes) == pytest.approx((6.0, 4.0))
    assert largest_batch(line, 30.0) == 6
    assert largest_batch(line, 30.0, limit=4) == 4
    assert largest_batch(line, 9.0) == 0  # not even one item
    with pytest.raises(ValueError, match="two batch sizes"):
        fit_memory_line({1: 10.0})


def test_the_reference_preset_runs_one_item_per_optimisation(tiny_models):
    from digin.core.kinds import run_job

    chunks = []
    params = {
        "diffusion": tiny_models["sd"],
        "classifier": tiny_models["classifier"],
        "classes": [0, 1],
        "guidance": {"preset": "reference", "ddim_steps": 2, "loss_steps": 1, "iterations": 1,
                     "num_cutouts": 2},
    }  # fmt: skip
    run_job("guided", params, max_batch=8, progress=lambda s, t, info: chunks.append(info["items"]))
    assert sorted({tuple(c) for c in chunks}) == [(0,), (1,)]


def _run(sd, clf, **fields):
    from digin.core.guidance import optimize
    from digin.core.objectives import ClassObjective

    cfg = GuidanceConfig(ddim_steps=3, iterations=2, num_cutouts=2, **fields)
    prompts = ["a photo of a tench", "a photo of a goldfish"]
    return optimize(
        sd,
        ClassObjective(clf, torch.tensor([0, 1])),
        cond=sd.encode_text(prompts),
        uncond=sd.null_text(2),
        seeds=[0, 1],
        config=cfg,
    )


def test_channels_last_gives_the_same_images_and_is_undone_afterwards(tiny_models):
    from digin.core.loaders import load_classifier, load_diffusion

    sd, clf = load_diffusion(tiny_models["sdxl"]), load_classifier(tiny_models["classifier"])
    base = _run(sd, clf)
    fast = _run(sd, clf, channels_last=True)
    assert sd.unet.conv_in.weight.is_contiguous()  # the shared model is back in its format
    diff = (fast.trajectory.float() - base.trajectory.float()).abs().max()
    assert diff <= 2  # uint8 levels: float rounding only
    assert torch.allclose(fast.clean_loss, base.clean_loss, atol=1e-4)
    # the per-iteration records come back to the host as before
    assert base.trajectory.dtype == torch.uint8 and base.trajectory.shape[:2] == (3, 2)
    assert base.latent_norms.shape == base.clean_loss.shape == (3, 2)
    assert base.train_loss.shape == (2, 2) and set(base.metrics) == {"p"}
    assert len(base.best_iteration) == 2 and all(isinstance(i, int) for i in base.best_iteration)
    best = base.clean_loss.argmin(0)
    assert base.best_iteration == best.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_ddim_chain_never_waits_for_the_gpu(tiny_models):
    """torch.cuda's sync debug mode raises on any host-device synchronisation in the chain."""
    from digin.core.guidance import Deltas, DenoisingLoop
    from digin.core.loaders import load_diffusion

    sd = load_diffusion(tiny_models["sdxl"], device="cuda")
    cfg = GuidanceConfig(ddim_steps=4, loss_steps=3)
    cond, uncond = sd.encode_text(["a photo of a tench"]), sd.null_text(1)
    loop = DenoisingLoop(sd, cfg, sd.resolution, uncond)
    z = torch.randn(1, *sd.latent_shape(), device="cuda", requires_grad=True)
    deltas = Deltas.zeros(cond, cfg.ddim_steps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x0s = loop(z, cond, deltas, keep_last=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(x0s) == 3


def test_the_weights_follow_the_precision_unless_kept_in_fp32():
    assert GuidanceConfig().weights_precision == "fp32"
    assert GuidanceConfig(precision="bf16").weights_precision == "bf16"
    assert GuidanceConfig(precision="bf16", weights="fp32").weights_precision == "fp32"  # autocast
    assert GuidanceConfig.from_preset("optimised", precision="fp32").weights_precision == "fp32"
    with pytest.raises(ParamsError) as err:
        validate_params(
            "guided",
            {"diffusion": SD, "classes": [1], "guidance": {"precision": "bf16", "weights": "fp16"}},
        )
    assert "weights" in str(err.value) and "precision" in str(err.value)


def test_the_model_cache_keeps_one_copy_per_weight_dtype(tiny_models):
    from digin.core.jobs import ModelCache

    cache = ModelCache()
    fp32 = cache.diffusion(tiny_models["sd"], "cpu")
    bf16 = cache.diffusion(tiny_models["sd"], "cpu", "bf16")
    assert fp32 is cache.diffusion(tiny_models["sd"], "cpu", "fp32")
    assert bf16 is not fp32 and (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="weights must be one of"):
        cache.diffusion(tiny_models["sd"], "cpu", "int8")


def test_bf16_weights_run_natively_and_keep_the_optimised_variables_in_fp32(tiny_models):
    from digin.core.loaders import load_classifier, load_diffusion

    clf = load_classifier(tiny_models["classifier"])
    sd = load_diffusion(tiny_models["sdxl"])
    base = _run(sd, clf)
    sd.to(torch.bfloat16)
    emb = sd.encode_text(["a photo"])
    assert emb.hidden.dtype == emb.pooled.dtype == torch.float32  # what the deltas add to
    seen = []
    hook = sd.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast changes nothing
        low = _run(sd, clf, precision="bf16")
    hook.remove()
    assert set(seen) == {torch.bfloat16}
    assert low.final_latents.dtype == torch.float32 and low.clean_loss.dtype == torch.float32
    assert torch.isfinite(low.clean_loss).all()
    diff = (low.trajectory[0].float() - base.trajectory[0].float()).abs().mean()
    assert diff < 8  # iteration 0: the same sample up to bf16 rounding (uint8 levels)


def test_recomputing_the_decoder_block_by_block_changes_nothing_but_memory(tiny_models):
    from digin.core.loaders import load_classifier, load_diffusion

    sd, clf = load_diffusion(tiny_models["sd"]), load_classifier(tiny_models["classifier"])
    base = _run(sd, clf)
    blocks = _run(sd, clf, checkpoint_decoder_blocks=True)
    assert not sd.vae.decoder.gradient_checkpointing  # the shared model is as it was
    assert torch.equal(blocks.trajectory, base.trajectory)
    assert torch.allclose(blocks.final_latents, base.final_latents, atol=1e-6)
    assert torch.allclose(blocks.train_loss, base.train_loss, atol=1e-6)
