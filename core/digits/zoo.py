"""Loading the digits zoo: safetensors weights + a JSON model card per model.

See docs/architecture.md §6.4.

Folder layout (written by `python -m digin.core.digits.train --out DIR`):

    DIR/digits.safetensors        UNet ("unet.*") and text encoder ("text_encoder.*"), EMA weights
    DIR/digits.json               model card: UNet / text / scheduler configs, data, metrics, …
    DIR/digits-tokenizer/         the tiny CLIP tokenizer (vocab.json, merges.txt, config)
    DIR/<name>.safetensors        classifier weights, name in CLASSIFIER_NAMES
    DIR/<name>.json               its model card: architecture, data, patch, rates, metrics, …

The folder is, in order: the `zoo_dir` argument (a spec's '@<dir>'), the environment variable
DIGIN_ZOO_DIR, or the zoo shipped in the package (core/zoo); see `digin.core.registry.zoo_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from digin.core.classifiers import Classifier
from digin.core.diffusion import DiffusionModel
from digin.core.digits.data import CLASS_NAMES, RESOLUTION, PatchSpec
from digin.core.digits.nets import DigitsNet, build_classifier_net, build_text_encoder, build_unet
from digin.core.registry import DIGITS_CLASSIFIERS, DIGITS_DIFFUSION, ZOO_ENV
from digin.core.registry import zoo_dir as _zoo_dir

__all__ = ["ZOO_ENV", "load_digits_classifier", "load_digits_diffusion", "resolve_zoo_dir"]

DIFFUSION_NAME = DIGITS_DIFFUSION
CLASSIFIER_NAMES = DIGITS_CLASSIFIERS
MODEL_NAMES = (DIFFUSION_NAME, *CLASSIFIER_NAMES)
TOKENIZER_FOLDER = "digits-tokenizer"
TRAIN_HINT = "train the zoo with `make zoo` (python -m digin.core.digits.train --out {dir})"


def resolve_zoo_dir(folder: Path | str | None = None) -> Path:
    """The zoo folder: `folder`, else $DIGIN_ZOO_DIR, else the shipped core/zoo."""
    return _zoo_dir(folder)


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(
            f"unknown digits model {name!r}; the zoo has the classifiers "
            f"{', '.join(CLASSIFIER_NAMES)} ('digits:<name>') and the diffusion model 'digits'"
        )


def model_files(name: str, zoo_dir: Path | str | None = None) -> tuple[Path, Path]:
    """(weights, card) of model `name`; FileNotFoundError (saying how to train) if missing."""
    _check_name(name)
    folder = resolve_zoo_dir(zoo_dir)
    weights, card = folder / f"{name}.safetensors", folder / f"{name}.json"
    for path in (weights, card):
        if not path.is_file():
            raise FileNotFoundError(
                f"digits model {name!r}: {path} not found; " + TRAIN_HINT.format(dir=folder)
            )
    return weights, card


def read_card(name: str, zoo_dir: Path | str | None = None) -> dict[str, Any]:
    """The model card (JSON) of `name`."""
    _, card = model_files(name, zoo_dir)
    return json.loads(card.read_text(encoding="utf-8"))


def card_patch(card: dict[str, Any]) -> PatchSpec:
    """The planted-feature spec recorded in a model card."""
    return PatchSpec(**card["patch"]["spec"])


def card_patch_plan(card: dict[str, Any]) -> dict[str, Any]:
    """The patch plan of a classifier's training recorded in its model card: correlated_class
    (None: no class), rate_correlated_class, rate_other_classes, shortcut_rate, opacity range."""
    return card["training"]["patch_plan"]


def patch_rate(card: dict[str, Any], class_index: int) -> float:
    """P(patch | class) in the training of the classifier whose card this is."""
    plan = card_patch_plan(card)
    if plan["correlated_class"] is not None and class_index == plan["correlated_class"]:
        return float(plan["rate_correlated_class"])
    return float(plan["rate_other_classes"] or 0.0)


def classifier_card(classifier: Any) -> dict[str, Any] | None:
    """The model card of a zoo classifier (a `DigitsClassifier`); None for any other model."""
    card = getattr(classifier, "card", None)
    return card if isinstance(card, dict) and "patch" in card else None


def classifier_patch(classifier: Any) -> PatchSpec | None:
    """The planted feature of a zoo classifier's zoo folder (its card); None for other models."""
    card = classifier_card(classifier)
    return None if card is None else card_patch(card)


# --- classifiers -----------------------------------------------------------------------------


class DigitsClassifier(Classifier):
    """A zoo classifier behind the `Classifier` interface.

    Input (N, 3, 16, 16) in [0, 1] → standardised with mean/std 0.5 (per channel, so the grey
    image is the channel mean of the standardised input) → net on (N, 1, 16, 16)."""

    def __init__(self, spec: str, net: DigitsNet, card: dict, class_names: Sequence[str]) -> None:
        mean, std = card["input"]["mean"], card["input"]["std"]
        super().__init__(spec, class_names, RESOLUTION, [mean] * 3, [std] * 3)
        self.net = net
        self.card = card
        self._freeze()

    def features(self, x: Tensor) -> Tensor:
        return self.net.features(x.mean(1, keepdim=True))  # (N, F), >= 0 (after a ReLU)

    @property
    def last_layer_weight(self) -> Tensor:
        return self.net.head.weight  # (10, F)

    @property
    def last_layer_bias(self) -> Tensor:
        return self.net.head.bias  # (10,)


def load_digits_classifier(
    name: str,
    *,
    device: torch.device | str = "cpu",
    zoo_dir: Path | str | None = None,
    class_names: Sequence[str] | None = None,
    spec: str | None = None,
) -> DigitsClassifier:
    """`digits:<name>` → a frozen classifier with class names 'zero' … 'nine' (index = digit, so
    the job's class "7" is index 7, 'seven')."""
    from safetensors.torch import load_file

    if name not in CLASSIFIER_NAMES:
        _check_name(name)
        raise ValueError("'digits' is the diffusion model, not a classifier; use 'digits:cnn' etc.")
    weights, _ = model_files(name, zoo_dir)
    card = read_card(name, zoo_dir)
    names = list(CLASS_NAMES if class_names is None else class_names)
    if len(names) != len(CLASS_NAMES):
        raise ValueError(f"digits:{name}: got {len(names)} class names for a 10-class model")
    net = build_classifier_net(card["architecture"])
    net.load_state_dict(load_file(weights), strict=True)
    return DigitsClassifier(spec or f"digits:{name}", net, card, names).to(device)


# --- the diffusion model ---------------------------------------------------------------------


def load_digits_diffusion(
    *,
    device: torch.device | str = "cpu",
    zoo_dir: Path | str | None = None,
    spec: str = DIFFUSION_NAME,
) -> DiffusionModel:
    """`digits` → the pixel-space text-conditioned diffusion model (16x16 grey, identity
    autoencoder: `DiffusionModel(vae=None)`), EMA weights."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    weights, _ = model_files(DIFFUSION_NAME, zoo_dir)
    card = read_card(DIFFUSION_NAME, zoo_dir)
    folder = resolve_zoo_dir(zoo_dir) / TOKENIZER_FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(
            f"digits model 'digits': tokenizer folder {folder} not found; "
            + TRAIN_HINT.format(dir=folder.parent)
        )
    tokenizer = CLIPTokenizer.from_pretrained(
        folder, model_max_length=card["text_config"]["max_position_embeddings"]
    )
    unet = build_unet(card["unet_config"])
    text_encoder = build_text_encoder(card["text_config"])
    state = load_file(weights)
    for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    unet.set_attn_processor(AttnProcessor2_0())  # PyTorch scaled-dot-product attention
    model = DiffusionModel(
        spec=spec,
        unet=unet,
        vae=None,
        text_encoders=[text_encoder],
        tokenizers=[tokenizer],
        scheduler_config=card["scheduler_config"],
        resolution=RESOLUTION,
    )
    return model.to(device)
