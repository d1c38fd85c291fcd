"""Neural PCA: principal components of a class's logit contributions (Neuhaus et al., "Spurious
Features Everywhere", ICCV 2023; docs/architecture.md §4.4).

Notation (paper → code):
    a       feats          (N, F) penultimate features (the input of the last linear layer)
    w_k     weight[k]      (F,) last-layer weights of class k; b_k its bias
    a ⊙ w_k contrib        (N, F) per-feature contributions: Σ_f contrib = logit_k − b_k
    μ       mean           (F,) mean contribution over the class-k images
    v_l     components[l]  (F,) l-th principal direction of the contributions (unit norm, by
                           explained variance, sign fixed so that 1·v_l ≥ 0)
    α_l     values[:, l]   ((a ⊙ w_k − μ)·v_l)(1·v_l), the component's share of the logit

Over a complete basis (all F components) Σ_l α_l = (a ⊙ w_k − μ)·1 = logit_k − b_k − 1·μ.
The factor (1·v_l) makes α_l independent of the sign of v_l, and positive exactly when the
component pushes the class-k logit up. Components come from the eigendecomposition of the
covariance, as in the official code (`neural_pca/pca.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from digin.core.classifiers import Classifier
from digin.core.context import StopFn, check_stop


@torch.no_grad()
def class_contributions(
    classifier: Classifier,
    images: Tensor,
    class_index: int,
    batch_size: int = 256,
    should_stop: StopFn | None = None,
) -> tuple[Tensor, Tensor]:
    """images (N, 3, r, r) in [0, 1] → (contrib a ⊙ w_k (N, F), logits (N, K)), on the CPU;
    `should_stop` is polled before every mini-batch (`Stopped`)."""
    device = next(classifier.parameters()).device
    w = classifier.last_layer_weight[class_index].float()  # (F,)
    contribs, logits = [], []
    for i in range(0, len(images), batch_size):
        check_stop(should_stop)
        out, feats = classifier.forward_features(images[i : i + batch_size].to(device))
        contribs.append((feats * w).cpu())
        logits.append(out.cpu())
    return torch.cat(contribs), torch.cat(logits)


def component_values(contrib: Tensor, mean: Tensor, components: Tensor) -> Tensor:
    """α: contrib (..., F), mean (F,) or broadcastable, components (L, F) → (..., L)."""
    return ((contrib - mean) @ components.T) * components.sum(-1)


@dataclass
class NeuralPCA:
    """The PCA of class k's contributions over a set of images."""

    class_index: int
    mean: Tensor  # (F,) μ
    components: Tensor  # (L, F) v_l as rows, L ≤ F, by explained variance (descending)
    explained_variance: Tensor  # (L,) eigenvalues of the covariance
    total_variance: float  # trace of the covariance (all F components)
    num_images: int

    @property
    def explained_variance_ratio(self) -> Tensor:
        return self.explained_variance / max(self.total_variance, 1e-12)

    def values(self, contrib: Tensor) -> Tensor:
        """α (N, L) of contributions (N, F)."""
        return component_values(contrib, self.mean, self.components)

    def truncated(self, num_components: int) -> NeuralPCA:
        """The top `num_components` components (all if there are fewer)."""
        n = min(num_components, len(self.components))
        return NeuralPCA(
            self.class_index,
            self.mean,
            self.components[:n],
            self.explained_variance[:n],
            self.total_variance,
            self.num_images,
        )


def fit_neural_pca(contrib: Tensor, class_index: int) -> NeuralPCA:
    """All F components of contributions (N, F), N ≥ 2: eigh of the covariance (float64)."""
    if contrib.dim() != 2 or len(contrib) < 2:
        raise ValueError(f"neural PCA needs at least 2 images, got {len(contrib)}")
    x = contrib.double()
    mean = x.mean(0)  # (F,)
    cov = (x - mean).T @ (x - mean) / (len(x) - 1)  # (F, F)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending; columns are eigenvectors
    order = eigvals.argsort(descending=True)
    eigvals, v = eigvals[order].clamp(min=0), eigvecs[:, order].T  # (F,), (F, F) rows v_l
    v = torch.where(v.sum(1, keepdim=True) < 0, -v, v)  # sign convention 1·v_l ≥ 0
    return NeuralPCA(
        class_index=class_index,
        mean=mean.float(),
        components=v.float(),
        explained_variance=eigvals.float(),
        total_variance=float(eigvals.sum()),
        num_images=len(x),
    )
