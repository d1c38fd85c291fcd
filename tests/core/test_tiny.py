"""The tiny random models (digin.core.tiny) load through diffusers, transformers, timm
and open_clip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from digin.core.tiny import make_tiny_models

PROMPT = "a photograph of a tench"


def _folder(spec: str) -> Path:
    return Path(spec.removeprefix("diffusers:"))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def test_specs(tiny_models):
    root = _folder(tiny_models["sd"]).parent
    assert root.is_absolute()
    assert tiny_models == {
        "sd": f"diffusers:{root / 'sd'}",
        "sdxl": f"diffusers:{root / 'sdxl'}",
        "classifier": f"timm:test_resnet@{root / 'classifier.safetensors'}",
        "open_clip": f"open_clip:tiny-clip/{root / 'open_clip' / 'tiny-clip.safetensors'}",
        "captioner": f"blip:{root / 'captioner'}",
        "segmenter": f"sam:{root / 'segmenter'}",
    }
    assert json.loads((root / "specs.json").read_text()) == tiny_models
    sidecar = json.loads((root / "classifier.json").read_text())
    assert sidecar["input_size"] == 32 and len(sidecar["class_names"]) == 10
    assert json.loads((root / "open_clip" / "tiny-clip.json").read_text())["embed_dim"] == 16


def test_deterministic_idempotent_and_rng_neutral(tiny_models, tmp_path):
    out = tmp_path / "again"
    (out / "sd" / "unet").mkdir(parents=True)
    (out / "sd" / "unet" / "stale.bin").write_bytes(b"old")
    state = torch.random.get_rng_state()
    specs = make_tiny_models(out)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert not (out / "sd" / "unet" / "stale.bin").exists()  # overwritten, not merged
    assert _digests(out) == _digests(_folder(tiny_models["sd"]).parent)  # same seed, same bytes
    assert specs["sd"] == f"diffusers:{out.resolve() / 'sd'}"


@pytest.mark.parametrize(("model", "subfolder"), [("sd", "tokenizer"), ("sdxl", "tokenizer_2")])
def test_tokenizer(tiny_models, model, subfolder):
    folder = _folder(tiny_models[model])
    lines = (folder / subfolder / "merges.txt").read_text().splitlines()
    assert lines[0] == "#version: 0.2"
    vocab = json.loads((folder / subfolder / "vocab.json").read_text())
    tok = CLIPTokenizer.from_pretrained(folder, subfolder=subfolder)
    assert tok.model_max_length == 77
    ids = tok(PROMPT).input_ids
    # one token per word, between the start and end tokens
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        *(f"{w}</w>" for w in PROMPT.split()),
        "<|endoftext|>",
    ]
    assert ids[-1] == vocab["<|endoftext|>"] == max(vocab.values())
    # anything else falls back to bytes; padding to 77 with the end token
    padded = tok(["Zürich, 12 ☃!", ""], padding="max_length", max_length=77).input_ids
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    for row in padded:
        assert len(row) == 77 and max(row) < text_encoder.config.vocab_size
    assert text_encoder.config.eos_token_id == vocab["<|endoftext|>"]


def test_sd_components_load(tiny_models):
    folder = _folder(tiny_models["sd"])
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    assert unet.config.sample_size == 32 and unet.config.cross_attention_dim == 32
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 2  # vae_scale_factor
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    assert text_encoder.config.hidden_size == 32
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert not scheduler.config.clip_sample and not scheduler.config.set_alpha_to_one


def test_sd_pipeline_generates_64px(tiny_models):
    pipe = StableDiffusionPipeline.from_pretrained(_folder(tiny_models["sd"]), use_safetensors=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.vae_scale_factor == 2
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all()


def test_sdxl_pipeline_generates_64px(tiny_models):
    folder = _folder(tiny_models["sdxl"])
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True)
    assert pipe.config.force_zeros_for_empty_prompt
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.text_encoder_2.config.projection_dim == 32
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == 64
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all()
