"""The classifiers under test, behind one interface (docs/architecture.md §6.2).

Every classifier takes images in ``[0, 1]``, NCHW, at its own square input size ``r`` (the caller
resizes; the guidance core crops and resizes), normalises them with its own mean/std and returns
float32 logits. ``forward_features`` also returns the penultimate features, the input of the last
linear layer, so that ``logits == features @ last_layer_weight.T + last_layer_bias``:

    timm            features = timm's pre-logits,          W, b = the classifier head
    open_clip       features = unit image embedding,       W = 100 · unit class text embeddings,
                                                           b = None (zero-shot, logits = 100 · cos)

Classifiers are frozen (eval mode, no parameter gradients) but differentiable w.r.t. the input.

Loading a classifier from its spec is `digin.core.loaders.load_classifier`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal, Protocol, TypedDict, Unpack, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ClipTemplates = Literal["openai", "simple"]
SIMPLE_TEMPLATE = "a photo of a {}."
CLIP_LOGIT_SCALE = 100.0  # zero-shot logits = 100 · cos(image, class text), as in CLIP
SIDECAR_KEYS = ("class_names", "input_size", "mean", "std", "model_kwargs")


class Classifier(nn.Module, ABC):
    """A frozen image classifier: ``forward(x)`` maps (N, 3, r, r) in [0, 1] to logits (N, K)."""

    _mean: Tensor  # buffers (1, 3, 1, 1)
    _std: Tensor

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


class _TimmModel(Protocol):
    """What TimmClassifier uses of a timm model beyond `nn.Module` (not part of its base class)."""

    def forward_features(self, x: Tensor) -> Tensor: ...

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor: ...

    def get_classifier(self) -> nn.Module: ...


class Card(TypedDict):
    """What a loaded model's card (or sidecar) gives its classifier, besides the spec."""

    class_names: Sequence[str]
    input_size: int
    mean: Sequence[float]
    std: Sequence[float]


class ModelClassifier(Classifier):
    """A classifier around a loaded third-party model (``self.model``), frozen with it."""

    def __init__(self, spec: str, model: nn.Module, **card: Unpack[Card]) -> None:
        super().__init__(spec, card["class_names"], card["input_size"], card["mean"], card["std"])
        self.model = model
        self._freeze()


class TimmClassifier(ModelClassifier):
    """A timm model; the last layer is its classifier head (``model.get_classifier()``)."""

    def forward(self, x: Tensor) -> Tensor:
        # The model's own forward: also right for heads that are not a single linear layer.
        return self.model(self.normalize(x)).float()  # (N, K)

    @property
    def _timm(self) -> _TimmModel:
        return cast(_TimmModel, self.model)

    def features(self, x: Tensor) -> Tensor:
        return self._timm.forward_head(self._timm.forward_features(x), pre_logits=True)  # (N, F)

    @property
    def _head(self) -> nn.Linear:
        head = self._timm.get_classifier()
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


class _ClipModel(Protocol):
    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor: ...


class ClipClassifier(ModelClassifier):
    """Zero-shot open_clip classifier: logits = 100 · cos(image embedding, class text embedding)."""

    _weight: Tensor  # buffer (K, D)

    def __init__(
        self, spec: str, model: nn.Module, text_embeddings: Tensor, **card: Unpack[Card]
    ) -> None:
        super().__init__(spec, model, **card)
        # (K, D): unit-norm class text embeddings (averaged over the templates), times 100
        self.register_buffer("_weight", CLIP_LOGIT_SCALE * text_embeddings, persistent=False)

    def features(self, x: Tensor) -> Tensor:
        clip = cast(_ClipModel, self.model)  # an open_clip CLIP model
        return clip.encode_image(x, normalize=True)  # (N, D), unit norm

    @property
    def last_layer_weight(self) -> Tensor:
        return self._weight

    @property
    def last_layer_bias(self) -> None:
        return None
