"""Full-size random-weight pipelines (digin.core.random_models): the shipped architecture
configs are the published ones, and a written pipeline folder loads through the normal loader."""

from __future__ import annotations

import json

import pytest
import torch

from digin.core import random_models
from digin.core.random_models import arch_dir, fill_random, make_random_models


def _meta_params(arch: str, part: str) -> int:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    raw = json.loads((arch_dir(arch) / part / "config.json").read_text())
    with torch.device("meta"):
        if part == "unet":
            model = UNet2DConditionModel.from_config(raw)
        elif part == "vae":
            model = AutoencoderKL.from_config(raw)
        else:
            config = CLIPTextConfig(**{k: v for k, v in raw.items() if k[0] != "_"})
            cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
            model = cls(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "part", "millions"),
    [
        # published sizes: SD 1.5 UNet 860M, VAE 84M, CLIP ViT-L/14 text 123M; SDXL UNet 2.6B,
        # OpenCLIP ViT-bigG/14 text with projection 695M
        ("sd15", "unet", 859.5),
        ("sd15", "vae", 83.7),
        ("sd15", "text_encoder", 123.1),
        ("sdxl", "unet", 2567.5),
        ("sdxl", "vae", 83.7),
        ("sdxl", "text_encoder", 123.1),
        ("sdxl", "text_encoder_2", 694.7),
    ],
)
def test_the_architectures_have_the_published_sizes(arch, part, millions):
    assert _meta_params(arch, part) / 1e6 == pytest.approx(millions, abs=0.1)


def test_the_configs_carry_the_published_values():
    sd15 = json.loads((arch_dir("sd15") / "unet" / "config.json").read_text())
    assert sd15["cross_attention_dim"] == 768 and sd15["sample_size"] == 64
    sdxl = json.loads((arch_dir("sdxl") / "unet" / "config.json").read_text())
    assert sdxl["transformer_layers_per_block"] == [1, 2, 10]
    assert sdxl["projection_class_embeddings_input_dim"] == 2816  # 6 × 256 + 1280
    assert sdxl["cross_attention_dim"] == 768 + 1280 and sdxl["sample_size"] == 128
    scaling = [json.loads((arch_dir(a) / "vae" / "config.json").read_text())["scaling_factor"]
               for a in ("sd15", "sdxl")]  # fmt: skip
    assert scaling == [0.18215, 0.13025]
    with pytest.raises(ValueError, match="arch must be one of sd15, sdxl"):
        arch_dir("sd3")


def test_fill_random_is_seeded_and_scaled_like_the_default_init():
    def net():
        return torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.LayerNorm(300))

    a, b, c = fill_random(net(), 0), fill_random(net(), 0), fill_random(net(), 1)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)
    bound = (3 / 400) ** 0.5  # uniform(-sqrt(3 / fan_in), +sqrt(3 / fan_in)): variance 1 / fan_in
    assert a[0].weight.abs().max() <= bound
    assert a[0].weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert torch.all(a[0].bias == 0) and torch.all(a[1].weight == 1) and torch.all(a[1].bias == 0)


@pytest.mark.slow
def test_a_written_sd15_pipeline_loads_through_the_normal_loader(tmp_path):
    """~2 GB of fp16 safetensors, read back in fp32 by `load_diffusion('diffusers:<dir>')`."""
    from diffusers import AutoencoderKL

    from digin.core.loaders import load_diffusion

    spec = make_random_models("sd15", tmp_path / "sd15", dtype="fp16", seed=3)
    assert spec == f"diffusers:{tmp_path / 'sd15'}"
    model = load_diffusion(spec)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # whatever the file stores
    assert model.resolution == 512 and not model.is_sdxl
    assert sum(p.numel() for p in model.unet.parameters()) == 859_520_964

    # the folder holds the seeded weights (rounded to fp16): rebuild the VAE (seed + 1) in memory
    config = json.loads((arch_dir("sd15") / "vae" / "config.json").read_text())
    vae = random_models._empty(lambda: AutoencoderKL.from_config(config), "cpu", torch.float16)
    fill_random(vae, 3 + 1)
    for name, p in vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[name], p.float()), name

    # the tokenizer uses the real CLIP ids for start/end, so the 49408-row embedding takes them
    ids = model.tokenizers[0]("a photograph of a tench").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and max(ids) < 49408
    cond = model.encode_text(["a photograph of a tench"])
    assert cond.hidden.shape == (1, 77, 768) and torch.isfinite(cond.hidden).all()
    with torch.no_grad():  # one UNet call and one decode at 64 px (8 × 8 latents)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = model.eps(z, torch.tensor(500), cond, None)
        image = model.decode(z)
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    assert image.shape == (1, 3, 64, 64) and image.min() >= 0 and image.max() <= 1
