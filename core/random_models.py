"""Full-size random-weight Stable Diffusion pipelines (and the captioner and segmenter of
counterfactuals), for speed and memory only.

The published architecture configs of Stable Diffusion 1.5 (`runwayml/stable-diffusion-v1-5`) and
SDXL (`stabilityai/stable-diffusion-xl-base-1.0`) ship as JSON under `core/archs/<arch>/` (no
weights). From them this module builds, offline and from a seed,

- `build_random_diffusion(arch)`: the `DiffusionModel` in memory (no disk round trip), and
- `make_random_models(arch, out_dir)`: a diffusers pipeline folder (safetensors) that the normal
  loader (`digin.core.loaders.load_diffusion("diffusers:<dir>")`) reads like a downloaded one.

`build_random_captioner` and `build_random_segmenter` build BLIP base and SAM-HQ (ViT-B or the
official ViT-H) from transformers' configs, with their modules' own initialisers.

The weights are random: the images are noise, the timings and memory are those of the real
models. Weights are filled from one seeded block of uniform noise scaled per tensor like PyTorch's
default initialisation (±sqrt(3 / fan_in) for matrices and kernels, norms 1, biases 0), which is
an order of magnitude faster than the modules' own initialisers on a CPU and keeps activations in
range. The CLIP tokenizers are written offline (`digin.core.tiny`): bytes and a few whole words,
padded to the real vocabulary size so that the start and end tokens have the real ids (49406,
49407).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from digin.core.diffusion import DiffusionModel
from digin.core.guidance import DTYPES

ARCHS_DIR = Path(__file__).parent / "archs"
ARCHS = ("sd15", "sdxl")
_BLOCK = 1 << 20  # length of the seeded noise block the weights are cut from


def arch_dir(arch: str) -> Path:
    """The folder of an architecture's published configs."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return ARCHS_DIR / arch


def _config(arch: str, name: str) -> dict:
    return json.loads((arch_dir(arch) / name).read_text(encoding="utf-8"))


@torch.no_grad()
def fill_random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter and buffer-free weight of `module` in place: tensors of two or
    more dims with uniform noise of PyTorch's default scale, 1-D weights (norms) with 1, biases
    and other 1-D tensors with 0. Deterministic in `seed`."""
    source = torch.rand(_BLOCK, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    blocks: dict[torch.device, torch.Tensor] = {}  # the source block, copied once per device
    for i, (name, p) in enumerate(module.named_parameters()):
        flat = p.view(-1)
        if p.device not in blocks:
            blocks[p.device] = source.to(p.device)
        block = blocks[p.device]
        if p.dim() < 2:
            flat.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        scale = (3.0 / (p.numel() // p.shape[0])) ** 0.5  # fan_in = numel / out_features
        offset = (i * 7919) % _BLOCK  # a different cut of the block for every tensor
        done = 0
        while done < flat.numel():
            n = min(flat.numel() - done, _BLOCK - offset)
            flat[done : done + n].copy_(block[offset : offset + n]).mul_(scale)
            done, offset = done + n, 0
    return module


def _empty(make, device: torch.device | str, dtype: torch.dtype):
    """Construct a module without running its initialisers, then allocate it on `device` with
    floating-point tensors in `dtype` (uninitialised: `fill_random` writes them)."""
    with torch.device("meta"):
        module = make()
    # nn.Module.to, not diffusers' override: it warns about fp32-only modules none of ours has.
    torch.nn.Module.to(module, dtype)
    return module.to_empty(device=device)


def _tokenizers(arch: str, folder: Path) -> list:
    """Write the arch's CLIP tokenizer(s) under `folder` and load them."""
    from digin.core.tiny import EOS, write_tokenizer

    names = ["tokenizer", "tokenizer_2"] if arch == "sdxl" else ["tokenizer"]
    vocab_size = _config(arch, "text_encoder/config.json")["vocab_size"]
    out = []
    for name in names:
        pad = _config(arch, f"{name}/tokenizer_config.json").get("pad_token", EOS)
        tokenizer, _ = write_tokenizer(folder / name, vocab_size=vocab_size, pad_token=pad)
        out.append(tokenizer)
    return out


def _components(arch: str, *, seed: int, dtype: torch.dtype, device: torch.device | str) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(name: str) -> CLIPTextConfig:
        raw = {k: v for k, v in _config(arch, f"{name}/config.json").items() if k[0] != "_"}
        return CLIPTextConfig(**raw)

    unet_config = _config(arch, "unet/config.json")
    vae_config = _config(arch, "vae/config.json")
    unet = _empty(lambda: UNet2DConditionModel.from_config(unet_config), device, dtype)
    unet.set_attn_processor(AttnProcessor2_0())
    vae = _empty(lambda: AutoencoderKL.from_config(vae_config), device, dtype)
    encoders = [_empty(lambda: CLIPTextModel(text_config("text_encoder")), device, dtype)]
    if arch == "sdxl":
        config_2 = text_config("text_encoder_2")
        encoders.append(_empty(lambda: CLIPTextModelWithProjection(config_2), device, dtype))
    parts = {"unet": unet, "vae": vae}
    parts.update({f"text_encoder{'_2' if i else ''}": e for i, e in enumerate(encoders)})
    for i, module in enumerate(parts.values()):
        fill_random(module, seed + i)
    # The text encoders' position ids are a buffer the meta device left uninitialised (the UNet
    # and the VAE have no buffers).
    for module in parts.values():
        for name, buf in module.named_buffers():
            if not name.endswith("position_ids"):
                raise RuntimeError(f"unexpected buffer {name} in a random {arch} component")
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return parts


def build_random_diffusion(
    arch: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> DiffusionModel:
    """The full-size `arch` pipeline with random weights, in memory (nothing written to disk
    besides the tokenizer files, in a temporary folder)."""
    parts = _components(arch, seed=seed, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory(prefix="digin-tokenizer-") as tmp:
        tokenizers = _tokenizers(arch, Path(tmp))
    encoders = [parts["text_encoder"], *([parts["text_encoder_2"]] if arch == "sdxl" else [])]
    vae = parts["vae"]
    index = _config(arch, "model_index.json")
    return DiffusionModel(
        spec=f"random:{arch}",
        unet=parts["unet"],
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler_config=_config(arch, "scheduler/scheduler_config.json"),
        resolution=parts["unet"].config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1),
        is_sdxl=arch == "sdxl",
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
    )


def make_random_models(
    arch: str, out_dir: Path | str, *, dtype: str = "fp16", seed: int = 0
) -> str:
    """Write the random-weight `arch` pipeline to `out_dir` (a new folder, or a pipeline folder,
    which is replaced) as a diffusers folder with safetensors weights stored in `dtype` (the
    loader computes in fp32 regardless; fp16 halves the disk size). Returns the spec that loads
    it, `diffusers:<out_dir>`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir).expanduser().resolve()
    src = arch_dir(arch)
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").exists():
        raise ValueError(f"{out} is not empty and not a pipeline folder; give a new folder")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _tokenizers(arch, out)
    parts = _components(arch, seed=seed, dtype=DTYPES[dtype], device="cpu")
    for name, module in parts.items():
        module.save_pretrained(out / name, safe_serialization=True)
        del module
    parts.clear()
    shutil.copytree(src / "scheduler", out / "scheduler")
    index = _config(arch, "model_index.json")
    if arch == "sd15":  # no safety checker in a random pipeline
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
        index["requires_safety_checker"] = False
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return f"diffusers:{out}"


# --- captioner and segmenter of counterfactuals ------------------------------------------------

# SAM-HQ image encoders beyond transformers' default (ViT-B, `syscv-community/sam-hq-vit-base`):
# ViT-H as in `syscv-community/sam-hq-vit-huge`, the official code's model.
SAM_VIT_H = {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
             "mlp_dim": 5120, "global_attn_indexes": [7, 15, 23, 31]}  # fmt: skip


def build_random_captioner(seed: int = 0, device: torch.device | str = "cpu"):
    """A random-weight BLIP captioner of full size: transformers' default `BlipConfig` (ViT-B/16
    at 384 px and a 12-layer BERT-base decoder, the architecture of
    `Salesforce/blip-image-captioning-base`). The tokenizer is the tiny models' word-piece
    vocabulary; generation keeps to its ids, so the timings are the real model's."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from digin.core.counterfactual.captions import Captioner
    from digin.core.tiny import bert_vocab

    tokenizer = BertTokenizer(vocab=bert_vocab(), bos_token="[DEC]", model_max_length=512)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig()).eval().requires_grad_(False).to(device)
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)
    return Captioner("blip:<random base>", model, processor)


def build_random_segmenter(seed: int = 0, size: str = "base", device: torch.device | str = "cpu"):
    """A random-weight SAM-HQ of full size: ViT-B (`size` 'base', transformers' default
    `SamHQConfig`) or ViT-H ('huge'), 1024 px input, with the real image processor."""
    from transformers import (
        SamHQConfig,
        SamHQMaskDecoderConfig,
        SamHQModel,
        SamHQProcessor,
        SamHQVisionConfig,
        SamImageProcessor,
    )

    from digin.core.counterfactual.masks import Segmenter

    if size not in ("base", "huge"):
        raise ValueError(f"size must be 'base' or 'huge', got {size!r}")
    config = SamHQConfig()
    if size == "huge":
        vision = {**SamHQVisionConfig().to_dict(), **SAM_VIT_H}
        decoder = {**SamHQMaskDecoderConfig().to_dict(), "vit_dim": SAM_VIT_H["hidden_size"]}
        config = SamHQConfig(vision_config=vision, mask_decoder_config=decoder)
    torch.manual_seed(seed)
    model = SamHQModel(config).eval().requires_grad_(False).to(device)
    processor = SamHQProcessor(image_processor=SamImageProcessor())
    return Segmenter(f"sam:<random {size}>", model, processor, hq=True)
