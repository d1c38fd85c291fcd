"""Spurious-feature reliance (the Spurious ImageNet protocol, Neuhaus et al., ICCV 2023).

For class k, two sets of images: real class-k images (the positives) and spurious images that
carry k's spurious feature but not the class (the negatives). The score is the AUC of p(k|x)
separating them: P(p(k|real) > p(k|spurious)) + ½ P(tie).

    1.0  perfectly separated: the feature alone does not make the classifier predict k
    0.5  the feature alone triggers k as strongly as the object (chance separation)
    < 0.5 the feature triggers k more strongly than the object itself

Plain numpy; the ROC plot is drawn with Pillow (matplotlib is not a dependency).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Scores = Sequence[float] | np.ndarray  # (N,) probabilities p(k|x)


def roc_auc(positive: Scores, negative: Scores) -> float:
    """P(pos > neg) + ½ P(pos == neg) over all pairs (the Mann-Whitney U statistic / n⁺n⁻)."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUC needs both sets non-empty, got {len(pos)} and {len(neg)} scores")
    scores = np.concatenate([pos, neg])
    ranks = _midranks(scores)  # 1-based, ties get their mean rank
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_curve(positive: Scores, negative: Scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score t (descending) with
    tpr = P(pos ≥ t), fpr = P(neg ≥ t), starting at (0, 0) (t = +inf) and ending at (1, 1).
    The trapezoid area under it equals `roc_auc`."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]  # descending
    tpr = (pos[None, :] >= thresholds[:, None]).mean(1)
    fpr = (neg[None, :] >= thresholds[:, None]).mean(1)
    return (
        np.concatenate([[0.0], fpr]),
        np.concatenate([[0.0], tpr]),
        np.concatenate([[np.inf], thresholds]),
    )


@dataclass
class SpuriousScore:
    """The score of one class."""

    class_index: int
    class_name: str
    auc: float
    mean_p_class: float  # mean p(k|x) over the real class-k images
    mean_p_spurious: float  # mean p(k|x) over the spurious images
    p_class: np.ndarray  # (N+,)
    p_spurious: np.ndarray  # (N-,)
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray

    @staticmethod
    def of(class_index: int, class_name: str, p_class: Scores, p_spurious: Scores) -> SpuriousScore:
        p_class, p_spurious = np.asarray(p_class, np.float64), np.asarray(p_spurious, np.float64)
        fpr, tpr, thresholds = roc_curve(p_class, p_spurious)
        return SpuriousScore(
            class_index,
            class_name,
            roc_auc(p_class, p_spurious),
            float(p_class.mean()),
            float(p_spurious.mean()),
            p_class,
            p_spurious,
            fpr,
            tpr,
            thresholds,
        )

    def to_json(self) -> dict:
        finite = [None if not np.isfinite(t) else float(t) for t in self.thresholds]
        return {
            "class_index": self.class_index,
            "class_name": self.class_name,
            "auc": self.auc,
            "mean_p_class": self.mean_p_class,
            "mean_p_spurious": self.mean_p_spurious,
            "num_class_images": len(self.p_class),
            "num_spurious_images": len(self.p_spurious),
            "roc": {
                "fpr": self.fpr.tolist(),
                "tpr": self.tpr.tolist(),
                "thresholds": finite,  # None = +inf (the (0, 0) point)
            },
            "p_class": self.p_class.tolist(),
            "p_spurious": self.p_spurious.tolist(),
        }


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip


def roc_plot(scores: Sequence[SpuriousScore], title: str = "", side: int = 360) -> Image.Image:
    """ROC curves (x: spurious images above the threshold, y: class images above it), one per
    class (the first 10 in the legend), and the chance diagonal; a white RGB image."""
    margin_l, margin_b, margin_t, margin_r = 52, 44, 28, 12
    width, height = margin_l + side + margin_r, margin_t + side + margin_b
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=11)

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return margin_l + fpr * side, margin_t + (1 - tpr) * side

    # axes, grid and ticks
    for t in np.linspace(0, 1, 6):
        gx, gy = xy(t, t)
        draw.line([xy(t, 0), xy(t, 1)], fill="#e6e6e6")
        draw.line([xy(0, t), xy(1, t)], fill="#e6e6e6")
        draw.text((gx, margin_t + side + 4), f"{t:.1f}", fill="black", font=font, anchor="mt")
        draw.text((margin_l - 4, gy), f"{t:.1f}", fill="black", font=font, anchor="rm")
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill="#999999", width=1)  # chance
    draw.text(
        (margin_l + side / 2, height - 4),
        "false positive rate (spurious images)",
        fill="black",
        font=font,
        anchor="md",
    )
    ylabel = Image.new("RGB", (side, 14), "white")
    ImageDraw.Draw(ylabel).text(
        (side / 2, 7), "true positive rate (class images)", fill="black", font=font, anchor="mm"
    )
    img.paste(ylabel.rotate(90, expand=True), (2, margin_t))
    if title:
        draw.text((margin_l + side / 2, 4), title, fill="black", font=font, anchor="mt")

    # curves and legend
    for i, s in enumerate(scores):
        color = PALETTE[i % len(PALETTE)]
        points = [xy(f, t) for f, t in zip(s.fpr, s.tpr, strict=True)]
        draw.line(points, fill=color, width=2)
        if i < 10:
            y = margin_t + side - 14 * (min(len(scores), 10) - i) - 4
            draw.line([(margin_l + side - 150, y + 6), (margin_l + side - 134, y + 6)], fill=color,
                      width=3)  # fmt: skip
            draw.text((margin_l + side - 130, y), f"{s.class_name[:14]}  AUC {s.auc:.3f}",
                      fill="black", font=font)  # fmt: skip
    return img
