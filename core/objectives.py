"""Classifier-derived objectives of the generative kinds (docs/architecture.md §4.3), minimised.

An objective holds its classifiers and per-item targets and maps the classifier *views* of a batch
of images (one tensor per classifier, (B, n, 3, r, r) in [0, 1], n cutouts or 1 clean view) to a
per-item loss (B,) and per-item metrics for logging. Losses are means over the n views, so a
batched run of B items equals B single runs. Objectives compose: `WeightedSum` adds terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from digin.core.classifiers import Classifier

ClassLoss = Literal["ce", "conf"]
DisagreementLoss = Literal["conf", "log_conf", "logits"]
NeuronMode = Literal["activate", "suppress", "activate_keep_class", "suppress_keep_class"]


@dataclass
class ObjectiveOutput:
    loss: Tensor  # (B,) per-item loss
    metrics: dict[str, Tensor] = field(default_factory=dict)  # name → (B,), detached


def _logits(classifier: Classifier, views: Tensor) -> Tensor:
    """(B, n, 3, r, r) → (B, n, K) float32 logits."""
    b, n = views.shape[:2]
    return classifier(views.flatten(0, 1).float()).float().view(b, n, -1)


def _pick(x: Tensor, index: Tensor) -> Tensor:
    """x (B, n, K), index (B,) → (B, n): the entry of each item's class."""
    return x.gather(-1, index.view(-1, 1, 1).expand(-1, x.shape[1], 1)).squeeze(-1)


def margin(logits: Tensor, target: Tensor) -> Tensor:
    """Target logit minus the largest *other* logit, (B, n, K) → (B, n)."""
    own = _pick(logits, target)
    others = logits.scatter(-1, target.view(-1, 1, 1).expand(-1, logits.shape[1], 1), -torch.inf)
    return own - others.amax(-1)


class Objective(torch.nn.Module):
    """Base: subclasses set `classifiers` and implement forward(views) -> ObjectiveOutput."""

    classifiers: Sequence[Classifier]


class ClassObjective(Objective):
    """`guided`: `ce` CE(f(x), y) = −log p(y|x), or `conf` −p(y|x); mean over views."""

    targets: Tensor  # buffer (B,)

    def __init__(self, classifier: Classifier, targets: Tensor, loss: ClassLoss = "ce") -> None:
        super().__init__()
        if loss not in ("ce", "conf"):
            raise ValueError(f"loss must be 'ce' or 'conf', got {loss!r}")
        self.classifiers = [classifier]
        self.loss = loss
        self.register_buffer("targets", targets.long(), persistent=False)  # (B,)

    def forward(self, views: list[Tensor]) -> ObjectiveOutput:
        logp = _logits(self.classifiers[0], views[0]).log_softmax(-1)  # (B, n, K)
        logp_y = _pick(logp, self.targets)  # (B, n)
        p = logp_y.exp().mean(1)  # (B,)
        loss = -logp_y.mean(1) if self.loss == "ce" else -p
        return ObjectiveOutput(loss, {"p": p.detach()})


class DisagreementObjective(Objective):
    """`disagreement`: make classifier 1 confident in y and classifier 2 not."""

    targets: Tensor  # buffers (B,)
    targets2: Tensor

    def __init__(
        self,
        first: Classifier,
        second: Classifier,
        targets: Tensor,
        loss: DisagreementLoss,
        targets2: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.classifiers = [first, second]
        self.loss = loss
        self.register_buffer("targets", targets.long(), persistent=False)  # (B,) in f1's classes
        t2 = targets if targets2 is None else targets2  # the same classes in f2's numbering
        self.register_buffer("targets2", t2.long(), persistent=False)

    def forward(self, views: list[Tensor]) -> ObjectiveOutput:
        logits1 = _logits(self.classifiers[0], views[0])
        logits2 = _logits(self.classifiers[1], views[1])
        logp1 = _pick(logits1.log_softmax(-1), self.targets)  # (B, n)
        logp2 = _pick(logits2.log_softmax(-1), self.targets2)
        if self.loss == "conf":
            loss = -logp1.exp().mean(1) + logp2.exp().mean(1)
        elif self.loss == "log_conf":
            loss = -logp1.mean(1) + logp2.mean(1)
        else:
            m1, m2 = margin(logits1, self.targets), margin(logits2, self.targets2)
            loss = -m1.mean(1) + m2.mean(1)
        metrics = {"p1": logp1.exp().mean(1).detach(), "p2": logp2.exp().mean(1).detach()}
        return ObjectiveOutput(loss, metrics)


class NeuronObjective(Objective):
    """`neuron`: a penultimate unit a_n (input of the last linear layer), optionally keeping
    class k: activate −a_n; suppress +a_n; activate_keep_class −10·a_n − 0.5·log p(k);
    suppress_keep_class +10·a_n − 0.5·log p(k)."""

    neurons: Tensor  # buffers (B,)
    classes: Tensor | None

    def __init__(
        self,
        classifier: Classifier,
        neurons: Tensor,
        mode: NeuronMode,
        classes: Tensor | None = None,
    ) -> None:
        super().__init__()
        if mode.endswith("_keep_class") and classes is None:
            raise ValueError(f"neuron mode {mode!r} needs a class for every item")
        self.classifiers = [classifier]
        self.mode = mode
        self.register_buffer("neurons", neurons.long(), persistent=False)  # (B,)
        self.register_buffer("classes", None if classes is None else classes.long(), False)

    def forward(self, views: list[Tensor]) -> ObjectiveOutput:
        b, n = views[0].shape[:2]
        logits, feats = self.classifiers[0].forward_features(views[0].flatten(0, 1).float())
        feats = feats.float().view(b, n, -1)  # (B, n, F)
        act = _pick(feats, self.neurons).mean(1)  # (B,)
        metrics = {"activation": act.detach()}
        plain = act if self.mode == "suppress" else -act  # the modes without the class term
        if self.classes is None:
            return ObjectiveOutput(plain, metrics)
        logp = _pick(logits.float().view(b, n, -1).log_softmax(-1), self.classes).mean(1)
        metrics["p"] = logp.exp().detach()
        if self.mode in ("activate", "suppress"):
            return ObjectiveOutput(plain, metrics)
        sign = -1.0 if self.mode == "activate_keep_class" else 1.0
        return ObjectiveOutput(sign * 10.0 * act - 0.5 * logp, metrics)


class ComponentObjective(Objective):
    """`pca_component`: a neural PCA component's share of the class-k logit (digin.core.pca),
    α_l = ((a ⊙ w_k − μ)·v_l)(1·v_l), maximised; with keep_class > 0 the class is kept:
    loss = −α_l − keep_class · log p(k|x)."""

    classes: Tensor  # buffers: (B,) class k, (B, F) μ, (B, F) v_l
    mean: Tensor
    directions: Tensor

    def __init__(
        self,
        classifier: Classifier,
        classes: Tensor,
        mean: Tensor,
        directions: Tensor,
        keep_class: float = 0.0,
    ) -> None:
        super().__init__()
        self.classifiers = [classifier]
        self.keep_class = keep_class
        self.register_buffer("classes", classes.long(), persistent=False)  # (B,) class k
        self.register_buffer("mean", mean.float().expand_as(directions), persistent=False)  # μ
        self.register_buffer("directions", directions.float(), persistent=False)  # (B, F) v_l

    def forward(self, views: list[Tensor]) -> ObjectiveOutput:
        b, n = views[0].shape[:2]
        clf = self.classifiers[0]
        logits, feats = clf.forward_features(views[0].flatten(0, 1).float())
        w_k = clf.last_layer_weight.float()[self.classes]  # (B, F)
        contrib = feats.float().view(b, n, -1) * w_k[:, None]  # (B, n, F) a ⊙ w_k
        v = self.directions[:, None]  # (B, 1, F)
        alpha = (((contrib - self.mean[:, None]) * v).sum(-1) * v.sum(-1)).mean(1)  # (B,)
        logp = _pick(logits.float().view(b, n, -1).log_softmax(-1), self.classes).mean(1)
        metrics = {"alpha": alpha.detach(), "p": logp.exp().detach()}
        return ObjectiveOutput(-alpha - self.keep_class * logp, metrics)
