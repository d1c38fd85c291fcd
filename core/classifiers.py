"""The classifiers under test, behind one interface (DESIGN §3.2 last paragraph, §3.4).

Every classifier takes images in ``[0, 1]``, NCHW, at its own square input size ``r`` (the caller
resizes; the guidance core crops and resizes), normalises them with its own mean/std and returns
float32 logits. ``forward_features`` also returns the penultimate features, the input of the last
linear layer, so that ``logits == features @ last_layer_weight.T + last_layer_bias``:

    timm            features = timm's pre-logits,          W, b = the classifier head
    open_clip       features = unit image embedding,       W = 100 · unit class text embeddings,
                                                           b = None (zero-shot, logits = 100 · cos)

Classifiers are frozen (eval mode, no parameter gradients) but differentiable w.r.t. the input.

Specs (parsed by ``core.registry.parse_spec``):

    timm:<name>                              timm model with its pretrained weights (hub)
    timm:<arch>@<file.safetensors>           a user's own weights, with an optional sidecar
                                             <file>.json: class_names, input_size, mean, std,
                                             model_kwargs (passed to timm.create_model)
    open_clip:<arch>/<pretrained tag|file>   zero-shot CLIP over the class names; a local file may
                                             bring its model config as <arch>.json beside it
    digits:<name>                            the bundled digits zoo (DESIGN §4)
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.classes import imagenet_class_names
from core.registry import parse_spec

ClipTemplates = Literal["openai", "simple"]
SIMPLE_TEMPLATE = "a photo of a {}."
CLIP_LOGIT_SCALE = 100.0  # zero-shot logits = 100 · cos(image, class text), as in CLIP
_SIDECAR_KEYS = ("class_names", "input_size", "mean", "std", "model_kwargs")


class Classifier(nn.Module, ABC):
    """A frozen image classifier: ``forward(x)`` maps (N, 3, r, r) in [0, 1] to logits (N, K)."""

    def __init__(
        self,
        spec: str,
        class_names: Sequence[str],
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.spec = spec  # the model spec it was loaded from
        self.class_names = list(class_names)  # K names
        self.input_size = int(input_size)  # r
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, x: Tensor) -> Tensor:
        """(N, 3, r, r) in [0, 1] → (N, 3, r, r) standardised with the model's mean/std."""
        r = self.input_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (r, r):
            raise ValueError(
                f"{self.spec} expects images of shape (N, 3, {r}, {r}) in [0, 1], "
                f"got {tuple(x.shape)}; resize them to the classifier's input_size first"
            )
        return (x - self._mean) / self._std

    @abstractmethod
    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, F) of a *normalised* batch (N, 3, r, r)."""

    @property
    @abstractmethod
    def last_layer_weight(self) -> Tensor:
        """(K, F): the weights of the last linear layer."""

    @property
    @abstractmethod
    def last_layer_bias(self) -> Tensor | None:
        """(K,) or None."""

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, 3, r, r) in [0, 1] → (logits (N, K), penultimate features (N, F)), float32."""
        feats = self.features(self.normalize(x)).float()  # (N, F)
        bias = self.last_layer_bias
        logits = F.linear(
            feats, self.last_layer_weight.float(), None if bias is None else bias.float()
        )
        return logits, feats

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 3, r, r) in [0, 1] → logits (N, K) float32."""
        return self.forward_features(x)[0]

    def train(self, mode: bool = True) -> Classifier:
        """Always stays in eval mode (batch norm statistics and dropout are part of the model
        under test), also when a parent module is switched to training."""
        return super().train(False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, num_classes={self.num_classes}, input_size={self.input_size}"


class TimmClassifier(Classifier):
    """A timm model; the last layer is its classifier head (``model.get_classifier()``)."""

    def __init__(
        self,
        spec: str,
        model: nn.Module,
        *,
        class_names: Sequence[str],
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(spec, class_names, input_size, mean, std)
        self.model = model
        self._freeze()

    def forward(self, x: Tensor) -> Tensor:
        # The model's own forward: also right for heads that are not a single linear layer.
        return self.model(self.normalize(x)).float()  # (N, K)

    def features(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (N, F)

    @property
    def _head(self) -> nn.Linear:
        head = self.model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{self.spec}: the classifier head is a {type(head).__name__}, not one linear "
                "layer, so penultimate features and last-layer weights are not defined"
            )
        return head

    @property
    def last_layer_weight(self) -> Tensor:
        return self._head.weight  # (K, F)

    @property
    def last_layer_bias(self) -> Tensor | None:
        return self._head.bias  # (K,) or None


class ClipClassifier(Classifier):
    """Zero-shot open_clip classifier: logits = 100 · cos(image embedding, class text embedding)."""

    def __init__(
        self,
        spec: str,
        model: nn.Module,
        text_embeddings: Tensor,
        *,
        class_names: Sequence[str],
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(spec, class_names, input_size, mean, std)
        self.model = model
        # (K, D): unit-norm class text embeddings (averaged over the templates), times 100
        self.register_buffer("_weight", CLIP_LOGIT_SCALE * text_embeddings, persistent=False)
        self._freeze()

    def features(self, x: Tensor) -> Tensor:
        return self.model.encode_image(x, normalize=True)  # (N, D), unit norm

    @property
    def last_layer_weight(self) -> Tensor:
        return self._weight

    @property
    def last_layer_bias(self) -> None:
        return None


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
        raise ValueError(f"{spec!r} names a diffusion model, not a classifier")
    if parsed.scheme == "timm":
        if parsed.weights is None:
            classifier = _load_timm_pretrained(spec, parsed.name, class_names)
        else:
            classifier = _load_timm_file(spec, parsed.arch, parsed.weights, class_names)
    elif parsed.scheme == "open_clip":
        classifier = _load_open_clip(
            spec, parsed.arch, parsed.weights, class_names, clip_templates, device
        )
    else:
        from core.digits.zoo import load_digits_classifier

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
    return _wrap_timm(spec, model, _class_names(spec, model.num_classes, class_names), {})


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
    import timm.data

    data = timm.data.resolve_model_data_config(model)  # input_size (3, H, W), mean, std
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
    if unknown := sorted(set(cfg) - set(_SIDECAR_KEYS)):
        raise ValueError(f"sidecar {path}: unknown keys {unknown}; known: {list(_SIDECAR_KEYS)}")
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

# (spec, weights file mtime, class names, templates) → (K, D) unit class text embeddings, on CPU
_TEXT_EMBEDDINGS: dict[tuple, Tensor] = {}


def _load_open_clip(
    spec: str,
    arch: str,
    tag: str,
    class_names: Sequence[str] | None,
    templates: ClipTemplates,
    device: torch.device | str,
) -> ClipClassifier:
    import open_clip

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
    key = (spec, stamp, tuple(names), templates)
    if key not in _TEXT_EMBEDDINGS:
        prompts = (
            open_clip.OPENAI_IMAGENET_TEMPLATES if templates == "openai" else [SIMPLE_TEMPLATE]
        )
        weights = open_clip.build_zero_shot_classifier(
            model, open_clip.get_tokenizer(arch), names, prompts, device=device
        )  # (D, K)
        _TEXT_EMBEDDINGS[key] = weights.T.float().cpu()  # (K, D)
    text = _TEXT_EMBEDDINGS[key].to(device)

    pp = open_clip.get_model_preprocess_cfg(model)  # size (int or (H, W)), mean, std
    size = pp["size"]
    h, w = (size, size) if isinstance(size, int) else size
    if h != w:
        raise ValueError(f"{spec}: the image tower's input size {h}x{w} is not square")
    return ClipClassifier(
        spec, model, text, class_names=names, input_size=h, mean=pp["mean"], std=pp["std"]
    )


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
