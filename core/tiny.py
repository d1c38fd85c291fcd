"""Tiny random-weight models for tests and demos (docs/architecture.md §6.5).

``make_tiny_models(out_dir)`` writes, offline and from fixed seeds, one model per loader in the
formats real checkpoints use, so tests go through the real loaders (never a mock of them):

    out_dir/sd/                       SD-1.x-style diffusers folder (64 px images, 32 px latents)
    out_dir/sdxl/                     SDXL-style diffusers folder (two text encoders)
    out_dir/classifier.safetensors    timm `test_resnet`, 10 classes, + classifier.json sidecar
    out_dir/open_clip/tiny-clip.*     open_clip model config + weights (32 px ViT)
    out_dir/captioner/                BLIP captioner in transformers layout (32 px ViT, BERT
                                      tokenizer from a small word-piece vocabulary)
    out_dir/segmenter/                SAM-HQ segmenter in transformers layout (64 px input)
    out_dir/specs.json                the model specs that load them

The diffusion components follow diffusers' own fast-test dummies (`get_dummy_components` in
`tests/pipelines/stable_diffusion*/`), except that the CLIP tokenizer is written here from a small
byte-level vocabulary instead of being downloaded from the hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from digin.core.classes import imagenet_class_names

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Whole-word merges, so that common prompt words become one token (all else falls back to bytes).
_WORDS = ("a", "an", "the", "of", "photo", "photograph", "picture", "painting", "tench", "goldfish")
_TEXT_VOCAB_SIZE = 1000  # text-encoder embedding rows; covers the tokenizer's ~550 ids


def make_tiny_models(out_dir: Path | str, seed: int = 0) -> dict[str, str]:
    """Write the tiny models under ``out_dir`` (overwriting) and return their specs by role:
    'sd', 'sdxl' (diffusion), 'classifier' (timm with own weights), 'open_clip' (zero-shot),
    'captioner' (BLIP), 'segmenter' (SAM-HQ)."""
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        _save_sd(out / "sd", seed)
        _save_sdxl(out / "sdxl", seed)
        _save_timm_classifier(out, seed)
        _save_open_clip(out / "open_clip", seed)
        _save_blip(out / "captioner", seed)
        save_tiny_sam(out / "segmenter", seed)
    specs = {
        "sd": f"diffusers:{out / 'sd'}",
        "sdxl": f"diffusers:{out / 'sdxl'}",
        "classifier": f"timm:test_resnet@{out / 'classifier.safetensors'}",
        "open_clip": f"open_clip:tiny-clip/{out / 'open_clip' / 'tiny-clip.safetensors'}",
        "captioner": f"blip:{out / 'captioner'}",
        "segmenter": f"sam:{out / 'segmenter'}",
    }
    (out / "specs.json").write_text(json.dumps(specs, indent=2) + "\n", encoding="utf-8")
    return specs


# --- CLIP tokenizer --------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for bytes 0..255 (GPT-2's
    `bytes_to_unicode`): printable Latin-1 bytes map to themselves, the rest to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tokenizer_files(
    vocab_size: int | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny CLIP vocabulary laid out like the real one: bytes, bytes + '</w>', merged words,
    then the start and end tokens (so the end token has the largest id, as CLIP pooling expects).
    With `vocab_size`, unused filler tokens pad it to that size first, so that the start and end
    tokens get the real CLIP ids (49406, 49407 for 49408) that full-size text encoders embed."""
    chars = _byte_chars()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # BPE symbols of a word: its characters, the last carrying the end-of-word suffix.
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab) + 2:
            raise ValueError(f"vocab_size must be at least {len(vocab) + 2}, got {vocab_size}")
        for n in range(len(vocab), vocab_size - 2):
            vocab[f"<|unused{n}|>"] = n  # never produced: no merge leads to it
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_tokenizer(
    folder: Path, vocab_size: int | None = None, pad_token: str = EOS
) -> tuple[CLIPTokenizer, dict[str, int]]:
    """Write vocab.json, merges.txt and tokenizer_config.json; load them back as CLIPTokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = _tokenizer_files(vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": pad_token,
        "unk_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder), vocab


def _text_config(vocab: dict[str, int], **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=_TEXT_VOCAB_SIZE,
        max_position_embeddings=77,
        **extra,
    )


# --- diffusion pipelines ---------------------------------------------------------------------


def _vae():
    from diffusers import AutoencoderKL

    # Two blocks: one downsampling, so vae_scale_factor 2 (64 px images ↔ 32 px latents).
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
    )


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # as in SD's own scheduler config (diffusers warns on 0)
    )


def _unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,  # latent side
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **extra,
    )


def _save_sd(folder: Path, seed: int) -> None:
    # (the defining module: `diffusers.StableDiffusionPipeline` is a placeholder to type checkers)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from transformers import CLIPTextModel

    shutil.rmtree(folder, ignore_errors=True)
    tokenizer, vocab = write_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=32)  # = text hidden size
    torch.manual_seed(seed)
    vae = _vae()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(vocab))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
        # None is accepted (without the safety checker); diffusers annotates both non-optional
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _save_sdxl(folder: Path, seed: int) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    shutil.rmtree(folder, ignore_errors=True)
    tokenizer, vocab = write_tokenizer(folder / "tokenizer")
    tokenizer_2, _ = write_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(seed)
    unet = _unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 micro-conditioning numbers × 8 + the pooled text embedding (projection_dim 32)
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,  # both encoders' hidden states, concatenated: 32 + 32
    )
    torch.manual_seed(seed)
    vae = _vae()
    torch.manual_seed(seed)
    config = _text_config(vocab, hidden_act="gelu", projection_dim=32)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_ddim(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,  # the invisible-watermark package is not a dependency
    )
    pipe.save_pretrained(folder, safe_serialization=True)


# --- classifiers -----------------------------------------------------------------------------


def _save_timm_classifier(out: Path, seed: int) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    save_file(model.state_dict(), out / "classifier.safetensors")
    # The sidecar: class names and a 32 px input (fast on 64 px tiny-SD images).
    sidecar = {"class_names": imagenet_class_names()[:10], "input_size": 32}
    (out / "classifier.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")


# An open_clip model config (the format of open_clip/model_configs/*.json): a 32 px ViT with 8 px
# patches and a one-layer text tower. The full CLIP vocabulary keeps open_clip's tokenizer usable.
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _save_open_clip(folder: Path, seed: int) -> None:
    from open_clip.model import CLIP  # type: ignore[import-untyped]  # no type information
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_CONFIG)
    save_file(model.state_dict(), folder / "tiny-clip.safetensors")
    text = json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n"
    (folder / "tiny-clip.json").write_text(text, encoding="utf-8")


# --- captioner and segmenter (counterfactuals) ---------------------------------------------------

# BERT word pieces: the special tokens (BLIP's decoder starts from [DEC]), whole words, then
# single characters and their '##' continuations, so that any lower-case text has tokens.
_BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
_CAPTION_WORDS = ("on", "in", "with", "and", "water", "grass", "background", "white", "small")


def bert_vocab() -> dict[str, int]:
    words = [*_WORDS, *_CAPTION_WORDS, *" ".join(imagenet_class_names()[:10]).split()]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = [*_BERT_SPECIAL, *dict.fromkeys(w for w in words if len(w) > 1), *chars]
    pieces += [f"##{c}" for c in chars if c.isalnum()]
    return {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}


def _save_blip(folder: Path, seed: int) -> None:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    shutil.rmtree(folder, ignore_errors=True)
    vocab = bert_vocab()
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
    ids = {"bos_token_id": vocab["[DEC]"], "sep_token_id": vocab["[SEP]"],
           "eos_token_id": vocab["[SEP]"], "pad_token_id": vocab["[PAD]"]}  # fmt: skip
    text = {"vocab_size": len(vocab), "hidden_size": 32, "encoder_hidden_size": 32,
            "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
            "max_position_embeddings": 64, "initializer_range": 0.2, **ids}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 32,
              "initializer_range": 0.02}  # not 1e-10: the image must matter  # fmt: skip
    torch.manual_seed(seed)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def save_tiny_sam(folder: Path, seed: int = 0, *, hq: bool = True) -> None:
    """A tiny SAM-HQ (`hq`) or SAM in transformers layout, 64 px input."""
    import transformers
    from transformers import SamImageProcessor

    kind = "SamHQ" if hq else "Sam"
    config_class, model_class, processor_class = (
        getattr(transformers, f"{kind}{part}") for part in ("Config", "Model", "Processor")
    )

    shutil.rmtree(folder, ignore_errors=True)
    vision = {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 64, "patch_size": 8, "window_size": 4,
              "global_attn_indexes": [1], "num_pos_feats": 16, "mlp_dim": 64,
              "initializer_range": 0.02}  # not 1e-10: the image must matter  # fmt: skip
    prompt = {"hidden_size": 32, "image_size": 64, "patch_size": 8, "mask_input_channels": 4}
    decoder = {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "iou_head_hidden_dim": 32, **({"vit_dim": 32} if hq else {})}  # fmt: skip
    torch.manual_seed(seed)
    config = config_class(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )
    model_class(config).save_pretrained(folder, safe_serialization=True)
    image_processor = SamImageProcessor(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    processor_class(image_processor=image_processor).save_pretrained(folder)
