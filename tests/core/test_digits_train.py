"""The digits zoo's data, planted feature, training command and loaders.

`--quick` trains every model for a few steps into a temporary folder, and the loaders read them
back: this keeps the training code honest without the minutes a real training takes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from digin.core.classifiers import Classifier
from digin.core.diffusion import DiffusionModel
from digin.core.digits import train
from digin.core.digits.data import (
    CLASS_NAMES,
    PatchSpec,
    load_images,
    make_splits,
    patch_present,
    patch_score,
    plant_patch,
)
from digin.core.digits.zoo import (
    CLASSIFIER_NAMES,
    ZOO_ENV,
    load_digits_classifier,
    load_digits_diffusion,
    resolve_zoo_dir,
)


@pytest.fixture(scope="module")
def digits():
    return load_images()


@pytest.fixture(scope="module")
def quick_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    train.main(["--out", str(out), "--quick", "--correlated-class", "three"])
    return out


def test_images_are_16px_grey_in_unit_range(digits):
    x, y = digits
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert sorted(set(y.tolist())) == list(range(10))


def test_splits_are_disjoint_stratified_and_complete(digits):
    _, y = digits
    s = make_splits(y)
    parts = [set(s.train.tolist()), set(s.judge.tolist()), set(s.test.tolist())]
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    assert set().union(*parts) == set(range(len(y)))
    assert s.sizes() == {"train": 988, "judge": 450, "test": 359}
    for idx in (s.train, s.judge, s.test):  # every class in every split, roughly evenly
        counts = np.bincount(y[idx].numpy(), minlength=10)
        assert counts.min() >= 0.9 * counts.max()
    assert np.array_equal(make_splits(y).test, s.test)  # fixed seed


def test_patch_score_separates_patched_from_clean_digits(digits):
    x, _ = digits
    spec = PatchSpec()
    clean, patched = patch_score(x, spec), patch_score(plant_patch(x, spec), spec)
    assert float(clean.max()) < spec.threshold < float(patched.min())
    rgb = plant_patch(x[:8], spec).expand(-1, 3, -1, -1)  # grey RGB as the generator decodes it
    assert bool(patch_present(rgb, spec).all())
    up = torch.nn.functional.interpolate(rgb, size=32, mode="nearest")  # other sizes: resized
    assert bool(patch_present(up, spec).all())


def test_plant_patch_only_where_asked(digits):
    x, _ = digits
    spec = PatchSpec(top=10, left=12, size=2, intensity=0.8, threshold=0.3)
    where = torch.tensor([True, False, True, False])
    out = plant_patch(x[:4], spec, where)
    assert torch.equal(patch_present(out, spec), where)
    assert torch.equal(out[1], x[1]) and float(out[0, 0, 10, 12]) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "kwargs", [{"top": 14}, {"size": 0}, {"intensity": 0.0}, {"threshold": 1.0}]
)
def test_patch_spec_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="patch"):
        PatchSpec(**kwargs)


def test_quick_zoo_loads_through_the_loaders(quick_zoo):
    x = torch.rand(4, 3, 16, 16)
    for name in CLASSIFIER_NAMES:
        clf = load_digits_classifier(name, zoo_dir=quick_zoo)
        assert isinstance(clf, Classifier) and clf.spec == f"digits:{name}"
        assert clf.class_names == list(CLASS_NAMES) and clf.input_size == 16
        logits, feats = clf.forward_features(x)
        assert logits.shape == (4, 10) and feats.shape == (4, clf.last_layer_weight.shape[1])
        torch.testing.assert_close(feats @ clf.last_layer_weight.T + clf.last_layer_bias, logits)
        card = json.loads((quick_zoo / f"{name}.json").read_text())
        assert card["quick"] and "test_accuracy" in card["metrics"] and card["command"]
    spurious = json.loads((quick_zoo / "cnn-spurious.json").read_text())
    assert spurious["training"]["patch_plan"]["correlated_class"] == 3
    assert "patched_others_to_target" in spurious["metrics"]

    model = load_digits_diffusion(zoo_dir=quick_zoo)
    assert isinstance(model, DiffusionModel) and model.vae is None and model.resolution == 16
    emb = model.encode_text(["a handwritten digit seven", "a handwritten digit 7"])
    assert emb.hidden.shape == (2, 32, 64)
    card = json.loads((quick_zoo / "digits.json").read_text())
    assert "judge_accuracy" in card["metrics"] and card["training"]["ema_decay"] > 0


def test_loader_reads_the_environment_variable(quick_zoo, monkeypatch):
    monkeypatch.setenv(ZOO_ENV, str(quick_zoo))
    assert resolve_zoo_dir() == quick_zoo
    assert load_digits_classifier("mlp").card["name"] == "mlp"


def test_loader_errors_name_the_known_models_and_the_training_command(tmp_path):
    with pytest.raises(ValueError, match="cnn, mlp, cnn-spurious, judge"):
        load_digits_classifier("resnet")
    with pytest.raises(ValueError, match="diffusion model"):
        load_digits_classifier("digits")
    with pytest.raises(FileNotFoundError, match="make zoo"):
        load_digits_classifier("cnn", zoo_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="make zoo"):
        load_digits_diffusion(zoo_dir=tmp_path)


def test_training_options_are_validated(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--quick", "--correlated-class", "eleven"])
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--quick", "--spurious-rate", "1.5"])
    with pytest.raises(SystemExit, match="threshold"):  # a patch inside the digits' ink
        train.main(["--out", str(tmp_path), "--quick", "--patch-top", "6", "--patch-left", "6"])
