"""Spurious-score maths (digin.core.spurious): AUC, ROC curve, the Pillow plot."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from digin.core.spurious import PALETTE, SpuriousScore, roc_auc, roc_curve, roc_plot


def test_auc_of_a_hand_computed_example():
    # class images (positives) 0.9 0.8 0.8 0.3, spurious images (negatives) 0.8 0.5 0.1.
    # Pairs won by the positive: 0.9 beats all 3; each 0.8 ties 0.8 (½) and beats 0.5, 0.1
    # (2.5 each); 0.3 beats 0.1 (1): (3 + 2.5 + 2.5 + 1) / 12 = 0.75.
    assert roc_auc([0.9, 0.8, 0.8, 0.3], [0.8, 0.5, 0.1]) == pytest.approx(0.75)


def test_auc_extremes():
    assert roc_auc([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0  # separated: no reliance
    assert roc_auc([0.1, 0.2], [0.9, 0.95]) == 0.0  # the feature beats the object
    assert roc_auc([0.5, 0.5], [0.5]) == 0.5  # indistinguishable
    with pytest.raises(ValueError, match="non-empty"):
        roc_auc([], [0.5])


def test_auc_agrees_with_sklearn_and_the_roc_area():
    rng = np.random.default_rng(0)
    pos = np.round(rng.random(200) * 0.8 + 0.2, 2)  # rounded: many ties
    neg = np.round(rng.random(150), 2)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    auc = roc_auc(pos, neg)
    assert auc == pytest.approx(roc_auc_score(labels, np.r_[pos, neg]))
    fpr, tpr, _ = roc_curve(pos, neg)
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(auc)


def test_roc_endpoints_and_monotonicity():
    fpr, tpr, thresholds = roc_curve([0.9, 0.8, 0.8, 0.3], [0.8, 0.5, 0.1])
    assert (fpr[0], tpr[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thresholds) < 0)
    # the hand example: thresholds 0.9, 0.8, 0.5, 0.3, 0.1
    np.testing.assert_allclose(tpr, [0, 0.25, 0.75, 0.75, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 2 / 3, 1])


def test_score_record_and_plot():
    a = SpuriousScore.of(7, "seven", [0.9, 0.8, 0.8, 0.3], [0.8, 0.5, 0.1])
    record = a.to_json()
    assert record["auc"] == pytest.approx(0.75)
    assert record["mean_p_class"] == pytest.approx(0.7)
    assert record["mean_p_spurious"] == pytest.approx(1.4 / 3)
    assert record["roc"]["thresholds"][0] is None  # +inf, as JSON
    assert record["num_class_images"] == 4 and record["num_spurious_images"] == 3
    b = SpuriousScore.of(3, "three", [0.1, 0.2], [0.9, 0.95])
    img = roc_plot([a, b], "title", side=200)
    assert img.mode == "RGB" and img.width > 200 and img.height > 200
    colors = {c for _, c in img.getcolors(maxcolors=100_000)}
    for hex_color in PALETTE[:2]:  # both curves are drawn
        assert Image.new("RGB", (1, 1), hex_color).getpixel((0, 0)) in colors
