"""Loaders: a model spec → a `DiffusionModel`, a `Classifier`, a `Captioner` or a `Segmenter`
(the factory, apart from the interfaces in `digin.core.diffusion`, `digin.core.classifiers` and
`digin.core.counterfactual`, as timm keeps `_factory.py` apart from its models).

Specs (parsed by `digin.core.registry.parse_spec`):

    diffusers:<hub id | folder>              Stable Diffusion 1.x/2.x or SDXL, safetensors only
    digits[@<zoo folder>]                    the bundled digits diffusion model
    timm:<name>                              timm model with its pretrained weights (hub)
    timm:<arch>@<file.safetensors>           a user's own weights, with an optional sidecar
                                             <file>.json: class_names, input_size, mean, std,
                                             model_kwargs (passed to timm.create_model)
    open_clip:<arch>/<pretrained tag|file>   zero-shot CLIP over the class names; a local file may
                                             bring its model config as <arch>.json beside it
    digits:<name>[@<zoo folder>]             the bundled digits zoo's classifiers
    blip:<hub id | folder>                   BLIP captioner (transformers), safetensors only
    sam:<hub id | folder>                    SAM or SAM-HQ segmenter (transformers), by the
                                             config's model_type; safetensors only
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from digin.core.classes import imagenet_class_names
from digin.core.classifiers import (
    SIDECAR_KEYS,
    SIMPLE_TEMPLATE,
    Classifier,
    ClipClassifier,
    ClipTemplates,
    TimmClassifier,
)
from digin.core.counterfactual.captions import Captioner
from digin.core.counterfactual.masks import Segmenter
from digin.core.diffusion import DiffusionModel
from digin.core.limits import LRU
from digin.core.registry import is_hub_id, parse_spec

# --- diffusion models ---------------------------------------------------------------------------


# What a diffusers pipeline's hub repository is read for: configs, safetensors weights and
# tokenizers of the components `load_diffusers` loads (no pickles, no fp16 duplicates).
HUB_FILES = ["model_index.json", "scheduler/*", "unet/*", "vae/*", "text_encoder/*",
             "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"]  # fmt: skip
HUB_IGNORED = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*.h5", "*.fp16.*",
               "*non_ema*"]  # fmt: skip


def pipeline_folder(name: str) -> Path:
    """The folder a diffusers spec's pipeline is read from. A hub id ('<owner>/<name>',
    `digin.core.registry.is_hub_id`) always goes through the hub: its snapshot in the Hugging
    Face cache (downloaded first where the machine has network), never a folder of that name
    under the working folder, which the model roots never checked. Any other name is a local
    folder (write './owner/name' for a relative one)."""
    return model_folder(name, "diffusers pipeline", HUB_FILES)


def model_folder(name: str, what: str, allow_patterns: list[str]) -> Path:
    """The folder of a model named by a hub id (its snapshot of the files `allow_patterns`
    match, in the Hugging Face cache) or a local folder (any other name)."""
    if is_hub_id(name):
        from huggingface_hub import snapshot_download  # network only where the machine has it

        return Path(
            snapshot_download(name, allow_patterns=allow_patterns, ignore_patterns=HUB_IGNORED)
        )
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {name} not found")
    return folder


def _load_config(folder: Path, name: str) -> dict:
    file = folder / name
    return json.loads(file.read_text()) if file.exists() else {}


def load_diffusers(name: str, *, device: torch.device | str = "cpu") -> DiffusionModel:
    """A Stable Diffusion 1.x/2.x or SDXL pipeline from a hub id or local folder (safetensors;
    `pipeline_folder`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = pipeline_folder(name)
    if not (path / "unet").is_dir():
        raise ValueError(f"{name} is not a diffusers pipeline folder (no unet/ subfolder)")
    index = _load_config(path, "model_index.json")
    scheduler_config = _load_config(path, "scheduler/scheduler_config.json")
    # fp32 weights whatever the checkpoint stores (fp16 variants included); lower precision is
    # the job's choice (GuidanceConfig.precision), not the checkpoint's.
    kw: dict[str, Any] = {"use_safetensors": True, "torch_dtype": torch.float32}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    unet.set_attn_processor(AttnProcessor2_0())  # PyTorch scaled-dot-product attention
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    is_sdxl = unet.config.addition_embed_type == "text_time"
    encoders: list[nn.Module] = [
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
    ]
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    if is_sdxl:
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
        )
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    model = DiffusionModel(
        spec=f"diffusers:{name}",
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        resolution=unet.config.sample_size * vae_scale,
        is_sdxl=is_sdxl,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", is_sdxl)),
    )
    return model.to(device)


def load_diffusion(spec: str, *, device: torch.device | str = "cpu") -> DiffusionModel:
    """Dispatch on the spec's scheme (docs/architecture.md §6.1)."""
    parsed = parse_spec(spec)
    if parsed.kind != "diffusion":
        raise ValueError(f"{spec!r} names a {parsed.kind}, not a diffusion model")
    if parsed.scheme == "digits":
        from digin.core.digits.zoo import load_digits_diffusion

        return load_digits_diffusion(device=device, zoo_dir=parsed.weights, spec=spec)
    return load_diffusers(parsed.name, device=device)


# --- classifiers -------------------------------------------------------------------------------


def load_classifier(
    spec: str,
    *,
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
    clip_templates: ClipTemplates = "openai",
) -> Classifier:
    """Load the classifier named by ``spec`` (see the module docstring) onto ``device``.

    ``class_names`` overrides the class names (their number must match the classifier's); by
    default ImageNet's for 1000-class models (and for zero-shot CLIP), else a sidecar's or
    'class_<i>'. ``clip_templates``: CLIP's 80 ImageNet prompt templates ("openai") or the single
    "a photo of a {}." ("simple").
    """
    parsed = parse_spec(spec)
    if parsed.kind != "classifier":
        raise ValueError(f"{spec!r} names a {parsed.kind} model, not a classifier")
    # parse_spec sets arch for every classifier, weights for open_clip (the tag or file)
    assert parsed.arch is not None
    classifier: Classifier
    if parsed.scheme == "timm":
        if parsed.weights is None:
            classifier = _load_timm_pretrained(spec, parsed.name, class_names)
        else:
            classifier = _load_timm_file(spec, parsed.arch, parsed.weights, class_names)
    elif parsed.scheme == "open_clip":
        assert parsed.weights is not None
        classifier = _load_open_clip(
            spec, parsed.arch, parsed.weights, class_names, clip_templates, device
        )
    else:
        from digin.core.digits.zoo import load_digits_classifier

        classifier = load_digits_classifier(
            parsed.arch, zoo_dir=parsed.weights, class_names=class_names, spec=spec
        )
    return classifier.to(device)


# --- timm ------------------------------------------------------------------------------------


def _load_timm_pretrained(
    spec: str, name: str, class_names: Sequence[str] | None
) -> TimmClassifier:
    import timm

    model = timm.create_model(name, pretrained=True)
    k = cast(int, model.num_classes)  # an int attribute (nn.Module types it Tensor | Module)
    return _wrap_timm(spec, model, _class_names(spec, k, class_names), {})


def _load_timm_file(
    spec: str, arch: str, weights: str, class_names: Sequence[str] | None
) -> TimmClassifier:
    import timm
    from safetensors.torch import load_file

    path = _local_file(spec, weights)
    if not timm.is_model(arch):
        raise ValueError(f"{spec}: unknown timm architecture {arch!r}")
    sidecar = _read_sidecar(path)
    state = load_file(path)

    # The class count comes from the weights of the last layer, e.g. 'fc.weight' (K, F).
    head = timm.models.get_pretrained_cfg_value(arch, "classifier") or "fc"
    head = head[0] if isinstance(head, tuple | list) else head
    if f"{head}.weight" not in state:
        raise ValueError(
            f"{spec}: {path.name} has no {head + '.weight'!r} tensor (timm {arch!r}'s last layer); "
            f"are these weights of a {arch}?"
        )
    k = state[f"{head}.weight"].shape[0]
    kwargs = {**sidecar.get("model_kwargs", {}), "num_classes": k}
    model = timm.create_model(arch, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{spec}: the weights do not fit timm {arch!r}: {e}") from e

    names = class_names if class_names is not None else sidecar.get("class_names")
    return _wrap_timm(spec, model, _class_names(spec, k, names), sidecar)


def _wrap_timm(spec: str, model: nn.Module, names: list[str], sidecar: dict) -> TimmClassifier:
    from timm.data.config import resolve_model_data_config

    data = resolve_model_data_config(model)  # input_size (3, H, W), mean, std
    _, h, w = data["input_size"]
    size = sidecar.get("input_size", h)
    if "input_size" not in sidecar and h != w:
        raise ValueError(
            f"{spec}: the model's input size {h}x{w} is not square; "
            "give a square input_size in the sidecar JSON"
        )
    mean, std = sidecar.get("mean", data["mean"]), sidecar.get("std", data["std"])
    return TimmClassifier(spec, model, class_names=names, input_size=size, mean=mean, std=std)


def _read_sidecar(weights: Path) -> dict[str, Any]:
    """The optional JSON beside the weights (same stem), validated except for the class count."""
    path = weights.with_suffix(".json")
    if not path.is_file():
        return {}
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"sidecar {path} must hold a JSON object, got {type(cfg).__name__}")
    if unknown := sorted(set(cfg) - set(SIDECAR_KEYS)):
        raise ValueError(f"sidecar {path}: unknown keys {unknown}; known: {list(SIDECAR_KEYS)}")
    names = cfg.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) and n for n in names)
    ):
        raise ValueError(f"sidecar {path}: class_names must be a list of non-empty strings")
    size = cfg.get("input_size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise ValueError(f"sidecar {path}: input_size must be a positive integer, got {size!r}")
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is not None and not (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"sidecar {path}: {key} must be a list of 3 numbers, got {value!r}")
    if any(s <= 0 for s in cfg.get("std", [1])):
        raise ValueError(f"sidecar {path}: std must be positive, got {cfg['std']}")
    if not isinstance(cfg.get("model_kwargs", {}), dict):
        raise ValueError(f"sidecar {path}: model_kwargs must be a JSON object")
    return cfg


# --- open_clip -------------------------------------------------------------------------------

# (spec, weights file mtime, class names, templates) → (K, D) unit class text embeddings, on CPU;
# keyed by the class names jobs send: the most recently used only (ImageNet's 1000 x 512 is 2 MB)
TEXT_EMBEDDINGS_CACHED = 64
_TEXT_EMBEDDINGS: LRU[tuple, Tensor] = LRU(TEXT_EMBEDDINGS_CACHED)


def _load_open_clip(
    spec: str,
    arch: str,
    tag: str,
    class_names: Sequence[str] | None,
    templates: ClipTemplates,
    device: torch.device | str,
) -> ClipClassifier:
    import open_clip  # type: ignore[import-untyped]  # ships no type information

    if templates not in ("openai", "simple"):
        raise ValueError(f"clip_templates must be 'openai' or 'simple', got {templates!r}")
    stamp = None
    if "/" in tag or os.sep in tag or tag.endswith((".safetensors", ".bin", ".pt", ".pth")):
        path = _local_file(spec, tag)  # a local weights file instead of a pretrained tag
        config = path.parent / f"{arch}.json"
        if config.is_file() and open_clip.get_model_config(arch) != _read_json(config):
            open_clip.add_model_config(config)  # registers <arch> for this process
        tag, stamp = str(path), path.stat().st_mtime_ns
    if arch not in open_clip.list_models():
        raise ValueError(
            f"{spec}: unknown open_clip architecture {arch!r} "
            "(a local weights file can bring its config as <arch>.json beside it)"
        )
    model = open_clip.create_model(arch, pretrained=tag, device=device, require_pretrained=True)
    model.eval()

    names = imagenet_class_names() if class_names is None else _class_names(spec, None, class_names)

    def embed() -> Tensor:
        prompts = (
            open_clip.OPENAI_IMAGENET_TEMPLATES if templates == "openai" else [SIMPLE_TEMPLATE]
        )
        weights = open_clip.build_zero_shot_classifier(
            model, open_clip.get_tokenizer(arch), names, prompts, device=device
        )  # (D, K)
        return weights.T.float().cpu()  # (K, D)

    key = (spec, stamp, tuple(names), templates)
    text = _TEXT_EMBEDDINGS.get_or_make(key, embed).to(device)

    pp = open_clip.get_model_preprocess_cfg(model)  # size (int or (H, W)), mean, std
    size = pp["size"]
    h, w = (size, size) if isinstance(size, int) else size
    if h != w:
        raise ValueError(f"{spec}: the image tower's input size {h}x{w} is not square")
    return ClipClassifier(
        spec, model, text, class_names=names, input_size=h, mean=pp["mean"], std=pp["std"]
    )


# --- captioners and segmenters (counterfactuals, docs/architecture.md §5.3, §5.6) ---------------

# What a transformers model's hub repository is read for: configs, processor and tokenizer files,
# safetensors weights (no pickles).
TRANSFORMERS_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
# config.json's model_type → the transformers model and processor classes of a segmenter
SEGMENTER_TYPES = {"sam": ("SamModel", "SamProcessor"), "sam_hq": ("SamHQModel", "SamHQProcessor")}


def _transformers_folder(spec: str, kind: str, what: str) -> tuple[Path, str]:
    """(the model's folder, its config's model_type) for a `kind` spec."""
    parsed = parse_spec(spec)
    if parsed.kind != kind:
        raise ValueError(f"{spec!r} names a {parsed.kind} model, not a {kind}")
    folder = model_folder(parsed.name, what, TRANSFORMERS_HUB_FILES)
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{spec}: {folder} has no config.json (not a transformers model folder)")
    model_type = _read_json(config).get("model_type")
    return folder, str(model_type)


def load_captioner(spec: str, *, device: torch.device | str = "cpu") -> Captioner:
    """A BLIP captioner (`blip:<hub id | folder>`, BlipForConditionalGeneration) in fp32."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder, model_type = _transformers_folder(spec, "captioner", "captioner")
    if model_type != "blip":
        raise ValueError(
            f"{spec}: model_type {model_type!r} is not a BLIP captioner (expected 'blip', "
            "e.g. Salesforce/blip-image-captioning-large)"
        )
    kw: dict[str, Any] = {"use_safetensors": True, "dtype": torch.float32}
    model = BlipForConditionalGeneration.from_pretrained(folder, **kw)
    processor = BlipProcessor.from_pretrained(folder)
    return Captioner(spec, model.eval().requires_grad_(False).to(device), processor)


def load_segmenter(spec: str, *, device: torch.device | str = "cpu") -> Segmenter:
    """A SAM or SAM-HQ segmenter (`sam:<hub id | folder>`, by config.json's model_type)."""
    import transformers

    folder, model_type = _transformers_folder(spec, "segmenter", "segmenter")
    if model_type not in SEGMENTER_TYPES:
        raise ValueError(
            f"{spec}: model_type {model_type!r} is not a segmenter; known: "
            f"{', '.join(SEGMENTER_TYPES)} (SAM, SAM-HQ)"
        )
    model_class, processor_class = (getattr(transformers, n) for n in SEGMENTER_TYPES[model_type])
    kw: dict[str, Any] = {"use_safetensors": True, "dtype": torch.float32}
    model = model_class.from_pretrained(folder, **kw)
    processor = processor_class.from_pretrained(folder)
    hq = model_type == "sam_hq"
    return Segmenter(spec, model.eval().requires_grad_(False).to(device), processor, hq=hq)


# --- shared ----------------------------------------------------------------------------------


def _local_file(spec: str, weights: str) -> Path:
    """A local .safetensors file (pickled checkpoints are never loaded)."""
    if "://" in weights:
        raise ValueError(
            f"{spec}: only local weight files are supported by the core loader, got the URI "
            f"{weights!r} (fetch it first, e.g. the worker downloads s3:// objects)"
        )
    path = Path(weights).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{spec}: weights must be a .safetensors file, got {path.name!r} "
            "(pickled checkpoints are never loaded; convert with safetensors.torch.save_file)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: weights file {path} not found")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _class_names(spec: str, k: int | None, given: Sequence[str] | None) -> list[str]:
    """``given`` (checked against K), else ImageNet's for K = 1000, else 'class_<i>'."""
    if given is not None:
        if isinstance(given, str) or not given or not all(isinstance(n, str) and n for n in given):
            raise ValueError(f"{spec}: class_names must be a sequence of non-empty strings")
        if k is not None and len(given) != k:
            raise ValueError(f"{spec}: got {len(given)} class names for a {k}-class model")
        return list(given)
    if k == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(k or 0)]
