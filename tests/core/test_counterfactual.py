"""Counterfactuals of real images (docs/architecture.md §5) on the tiny random Stable
Diffusion models: inversion, prompt-to-prompt control, masks, regularisers, the inversion cache,
the job and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from digin.cli import app
from digin.core.config import GuidanceConfig
from digin.core.counterfactual.attention import (
    CrossAttentionControl,
    controlled_cross_attention,
    find_words,
    token_span,
)
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.counterfactual.edit import EditStart, Regularizers, masked_l2
from digin.core.counterfactual.images import load_start_image
from digin.core.counterfactual.inversion import InversionCache, invert
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job
from digin.core.output import render_artifacts

RES = 32  # 32 px images (16 x 16 latents)
FAST = {"ddim_steps": 3, "iterations": 2, "loss_steps": 2, "num_cutouts": 2, "lr": 0.05}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these small models gain little from two, and two threads lose many
    times their speed when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A smooth 48 x 40 RGB image (not square: the loader resizes and centre-crops)."""
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 5, 6, generator=gen)
    pixels = torch.nn.functional.interpolate(small, size=(40, 48), mode="bicubic").clamp(0, 1)
    path = tmp_path_factory.mktemp("images") / "start.png"
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


def _params(tiny_models, image_file, **extra):
    return {
        "image": str(image_file),
        "diffusion": tiny_models["sd"],
        "classifier": tiny_models["classifier"],
        "resolution": RES,
        "start_class": "tench",
        "guidance": FAST,
        **extra,
    }


def test_null_text_inversion_reconstructs_better_than_plain_ddim(tiny_models, image_file, cache):
    model = cache.diffusion(tiny_models["sd"], "cpu")
    pixels = load_start_image(str(image_file), resolution=RES).pixels
    inversion = invert(
        model,
        pixels,
        model.encode_text(["a photograph of a tench"]),
        model.null_text(1),
        guidance=GuidanceConfig(ddim_steps=3, loss_steps=1),
        config=CounterfactualConfig(),
    )
    errors = inversion.errors
    assert errors["null_text_latent_mse"] < errors["ddim_latent_mse"]
    assert inversion.null_texts.hidden.shape == (3, 1, 77, 32)  # ∅_i per step
    assert inversion.z_T.shape == (1, 4, 16, 16) and len(inversion.inner_steps) == 3


def test_target_equal_to_start_with_zero_lr_gives_the_reconstruction(
    tiny_models, image_file, cache
):
    before = {
        n: type(p)
        for n, p in cache.diffusion(tiny_models["sd"], "cpu").unet.attn_processors.items()
    }
    params = _params(tiny_models, image_file, targets=["tench"], guidance={**FAST, "lr": 0.0})
    result = run_job("counterfactual", params, cache=cache)
    g = result.guidance
    assert torch.allclose(g.images, result.reconstruction, atol=1e-4)
    assert torch.allclose(g.trajectory[0].float() / 255, result.reconstruction, atol=1 / 255)
    assert result.items[0].prompt == result.caption == "a photograph of a tench"
    model = cache.diffusion(tiny_models["sd"], "cpu")
    after = {n: type(p) for n, p in model.unet.attn_processors.items()}
    assert after == before  # the SDPA processors are back


def test_all_zero_foreground_mask_makes_masked_regularisers_unmasked():
    gen = torch.Generator().manual_seed(0)
    z0, x0 = torch.randn(1, 4, 8, 8, generator=gen), torch.rand(1, 3, 16, 16, generator=gen)
    start = EditStart(
        z_T=z0,
        null_texts=None,
        templates=None,
        z0=z0,
        x0=x0,
        latent_mask=torch.zeros(1, 1, 8, 8),
        pixel_mask=torch.zeros(1, 1, 16, 16),
    )
    config = CounterfactualConfig(latent_l2=1.0, pixel_l2=1.0, latent_l1=1.0)
    regularizers = Regularizers(config, start)
    latents, images = (
        torch.randn(3, 4, 8, 8, generator=gen),
        torch.rand(3, 3, 16, 16, generator=gen),
    )
    total, parts = regularizers(latents, images)
    assert torch.allclose(parts["latent_background_l2"], parts["latent_l2"])
    assert torch.allclose(parts["pixel_background_l2"], parts["pixel_l2"])
    assert torch.allclose(parts["latent_l2"], ((latents - z0) ** 2).flatten(1).mean(1))
    expected = 25 * parts["latent_l2"] + 250 * parts["pixel_l2"]
    assert torch.allclose(
        total, expected + parts["latent_l2"] + parts["pixel_l2"] + parts["latent_l1"]
    )
    # a full foreground mask switches the background terms off
    full = torch.ones(1, 1, 8, 8)
    assert torch.all(masked_l2(latents, z0, 1 - full) == 0)
    # LPIPS is off by default and never downloads: without its package or weights, an error
    with pytest.raises(ValueError, match="lpips"):
        Regularizers(CounterfactualConfig(lpips=1.0), start)


def test_inversion_cache_is_hit_on_a_second_target(tiny_models, image_file):
    cache = ModelCache()
    first = run_job(
        "counterfactual",
        _params(tiny_models, image_file, targets=[1, 2], guidance={**FAST, "iterations": 0}),
        cache=cache,
    )
    second = run_job(
        "counterfactual",
        _params(tiny_models, image_file, targets=[3], guidance={**FAST, "iterations": 0}),
        cache=cache,
    )
    inversions: InversionCache = cache.get(("counterfactual", "inversions"), InversionCache)
    assert (inversions.misses, inversions.hits, len(inversions)) == (1, 1, 1)
    assert not first.inversion_cached and second.inversion_cached
    assert second.inversion is first.inversion
    assert second.summary()["inversion"]["cached"] is True
    # another caption is another inversion
    third = run_job(
        "counterfactual",
        _params(
            tiny_models,
            image_file,
            targets=[3],
            caption="a painting of a tench",
            guidance={**FAST, "iterations": 0},
        ),
        cache=cache,
    )
    assert not third.inversion_cached and inversions.misses == 2


def test_job_summary_and_artifacts(tiny_models, image_file, cache):
    calls = []
    result = run_job(
        "counterfactual",
        _params(tiny_models, image_file, targets=["goldfish", 2, 3]),
        seed=5,
        cache=cache,
        max_batch=2,
        progress=lambda s, t, info: calls.append((s, t, info.get("stage"))),
    )
    assert [it.seed for it in result.items] == [5, 6, 7]
    assert [it.target_index for it in result.items] == [1, 2, 3]
    assert result.items[0].prompt == "a photograph of a goldfish"
    assert calls[0] == (0, 6, "inverting") and calls[-1][:2] == (6, 6)  # two batches of 3
    summary = result.summary()
    item = summary["items"][0]
    assert item["p2p_fraction"] in (0.3, 0.4, 0.5) and set(item["p2p_search"]) == {
        "0.3",
        "0.4",
        "0.5",
    }
    for key in ("before", "after", "reconstruction", "edit"):
        assert 0 <= item[key]["p_target"] <= 1 and 0 <= item[key]["p_start"] <= 1
    assert isinstance(item["flip"], bool) and item["l1_distance"] >= 0
    assert len(item["metrics"]["p"]) == FAST["iterations"] + 1
    assert {"latent_background_l2", "pixel_background_l2", "ce"} <= set(item["metrics"])
    assert summary["start_class"] == {"index": 0, "name": "tench", "given": True}
    assert summary["inversion"]["null_text_latent_mse"] >= 0
    arts = render_artifacts(result)
    names = {"original.png", "reconstruction.png", "mask.png", "grid.png", "result.json"}
    assert names | {"item_000.png", "item_002_start.png"} <= set(arts)
    assert json.loads(arts["result.json"])["artifacts"] == sorted(arts)


def test_token_spans_and_alignment(tiny_models, cache):
    tokenizer = cache.diffusion(tiny_models["sd"], "cpu").tokenizers[0]
    caption = "a photograph of a great white shark, swimming"
    words = find_words(caption, "Great white shark")
    assert caption[slice(*words)] == "great white shark"
    first, stop = token_span(tokenizer, caption, words)
    ids = tokenizer(caption).input_ids
    assert first == 5 and tokenizer.decode(ids[first:stop]).strip() == "great white shark"


def test_cross_attention_control_stores_injects_and_restores(tiny_models, cache):
    model = cache.diffusion(tiny_models["sd"], "cpu")
    unet = model.unet
    z = torch.randn(1, 4, 16, 16)
    text = model.encode_text(["", "a photograph of a tench"])
    control = CrossAttentionControl()
    t = torch.tensor(500)
    with controlled_cross_attention(unet, control), torch.no_grad():
        control.store(1)
        stored = model.eps(torch.cat([z, z]), t, text, None)
        assert control.maps and all(m[0].shape[0] == 8 for m in control.maps.values())  # heads
        other = model.encode_text(["", "a photograph of a goldfish"])
        control.off()
        plain = model.eps(torch.cat([z, z]), t, other, None)
        control.inject(torch.tensor([1]), torch.eye(77)[None])
        injected = model.eps(torch.cat([z, z]), t, other, None)
    assert not torch.equal(plain, injected)  # the tench maps changed the goldfish pass
    with controlled_cross_attention(unet, control), torch.no_grad():
        control.inject(torch.tensor([0]), torch.eye(77)[None])  # step 0 is not < 0: no injection
        assert torch.equal(model.eps(torch.cat([z, z]), t, other, None), plain)
    assert not torch.allclose(stored, injected)  # but the values (v) are the goldfish's
    assert "Controlled" not in " ".join(type(p).__name__ for p in unet.attn_processors.values())


def test_cli_run_counterfactual(tiny_models, image_file, tmp_path):
    params = _params(tiny_models, image_file, targets=[1], guidance={**FAST, "iterations": 1})
    path = tmp_path / "p.json"
    path.write_text(json.dumps(params))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", "counterfactual", "--params", str(path), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    assert summary["kind"] == "counterfactual" and summary["image"]["size"] == [48, 40]
    assert Image.open(out / "item_000.png").size == (RES, RES)
    assert (out / "mask.png").exists() and (out / "grid.png").exists()
    # a caption without the start class is refused, naming it
    path.write_text(json.dumps({**params, "caption": "a photograph of a fish"}))
    result = CliRunner().invoke(
        app, ["run", "counterfactual", "--params", str(path), "--out", str(tmp_path / "o2")]
    )
    assert result.exit_code == 2 and "does not name the start class 'tench'" in result.output


def test_sdxl_uploaded_image_and_zero_shot_clip(tiny_models, image_file):
    params = {
        "image_id": "upload-1",
        "diffusion": tiny_models["sdxl"],
        "classifier": tiny_models["open_clip"],
        "clip_templates": "simple",
        "resolution": RES,
        "start_class": "tench",
        "targets": ["goldfish"],
        "guidance": {"ddim_steps": 2, "iterations": 1, "loss_steps": 1, "num_cutouts": 2},
        "counterfactual": {"p2p_fractions": [0.5], "null_text_steps": 2},
    }
    with pytest.raises(ValueError, match="only the service can resolve"):
        run_job("counterfactual", params, cache=ModelCache())
    result = run_job(
        "counterfactual",
        params,
        cache=ModelCache(),
        image_resolver=lambda image_id: image_file.read_bytes(),
    )
    assert result.image.source == "id:upload-1"
    assert result.inversion.null_texts.pooled.shape[:2] == (2, 1)  # SDXL: pooled ∅_i too
    assert result.guidance.images.shape == (1, 3, RES, RES)
    assert result.items[0].prompt == "a photograph of a goldfish"


def test_cooperative_stop_in_the_inversion_and_in_the_edit(tiny_models, image_file):
    cache = ModelCache()
    params = _params(tiny_models, image_file, targets=[1, 2])
    stopped = run_job("counterfactual", params, cache=cache, should_stop=lambda: True)
    assert stopped.stopped and stopped.items == [] and stopped.guidance is None
    assert set(render_artifacts(stopped)) == {"original.png", "grid.png", "caption.txt",
                                              "result.json"}  # fmt: skip
    inversions = cache.get(("counterfactual", "inversions"), InversionCache)
    assert len(inversions) == 0  # a stopped inversion is not cached
    run_job("counterfactual", params, cache=cache)  # inverts and caches
    again = run_job("counterfactual", params, cache=cache, should_stop=lambda: True)
    assert again.inversion_cached and again.stopped
    # polled at every DDIM step: the edit stops in its first chain, before any iteration
    assert again.guidance is None and again.items == []
    shown = {"original.png", "reconstruction.png", "mask.png", "grid.png", "caption.txt",
             "result.json"}  # fmt: skip
    assert set(render_artifacts(again)) == shown  # what the steps before the edits made
