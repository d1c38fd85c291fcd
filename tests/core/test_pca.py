"""Neural PCA maths (digin.core.pca), its objective, image sets, and the params of the
three kinds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from digin.core.analysis import load_pca
from digin.core.imagesets import load_image_set
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job
from digin.core.objectives import ComponentObjective
from digin.core.params import ImageSetSpec, ParamsError, validate_params
from digin.core.pca import class_contributions, component_values, fit_neural_pca


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture(scope="module")
def cnn(cache):
    return cache.classifier("digits:cnn", "cpu", "openai")


def _contrib(n=40, f=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g) * torch.linspace(3, 0.1, f)  # decreasing variances


def test_alphas_sum_to_the_logit_minus_bias_minus_mean(cnn):
    """Over all F components: Σ_l α_l = logit_k − b_k − 1·μ, for every image."""
    from digin.core.digits.data import load_images

    x, y = load_images()
    images = x[y == 3][:60].expand(-1, 3, -1, -1)
    contrib, logits = class_contributions(cnn, images, 3)  # (60, 64), (60, 10)
    pca = fit_neural_pca(contrib, 3)
    assert pca.components.shape == (64, 64)
    alpha = pca.values(contrib)  # (60, 64)
    expected = logits[:, 3] - cnn.last_layer_bias[3] - pca.mean.sum()
    torch.testing.assert_close(alpha.sum(1), expected, atol=1e-3, rtol=1e-4)
    # and a ⊙ w_k itself sums to the logit minus the bias
    torch.testing.assert_close(contrib.sum(1), logits[:, 3] - cnn.last_layer_bias[3])


def test_components_are_orthonormal_sorted_and_sign_fixed():
    contrib = _contrib()
    pca = fit_neural_pca(contrib, 0)
    v = pca.components.double()
    torch.testing.assert_close(v @ v.T, torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)
    ev = pca.explained_variance
    assert bool((ev[:-1] >= ev[1:]).all())
    assert bool((v.sum(1) >= 0).all())  # 1·v_l ≥ 0
    # eigenvalues = variances of the projections; the ratios sum to 1 over all components
    proj = (contrib - pca.mean) @ pca.components.T
    torch.testing.assert_close(proj.var(0), ev, rtol=1e-4, atol=1e-5)
    assert float(pca.explained_variance_ratio.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(pca.mean, contrib.mean(0))


def test_alpha_is_independent_of_the_sign_of_v_and_truncation_keeps_columns():
    contrib = _contrib(seed=1)
    pca = fit_neural_pca(contrib, 0)
    flipped = component_values(contrib, pca.mean, -pca.components)
    torch.testing.assert_close(flipped, pca.values(contrib))
    top = pca.truncated(3)
    assert top.components.shape == (3, 12) and top.total_variance == pca.total_variance
    torch.testing.assert_close(top.values(contrib), pca.values(contrib)[:, :3])
    assert len(pca.truncated(100).components) == 12


def test_pca_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_neural_pca(torch.ones(1, 4), 0)


def test_component_objective_alpha_matches_the_pca(cnn):
    """The guidance objective's α (clean view) equals the PCA's α of the same images, and its
    loss is −α − keep_class · log p(k|x)."""
    from digin.core.digits.data import load_images

    x, y = load_images()
    images = x[y == 7][:20].expand(-1, 3, -1, -1)
    contrib, logits = class_contributions(cnn, images, 7)
    pca = fit_neural_pca(contrib, 7)
    b = 4
    comps = torch.tensor([0, 1, 2, 5])
    objective = ComponentObjective(
        cnn, torch.full((b,), 7), pca.mean, pca.components[comps], keep_class=0.5
    )
    out = objective([images[:b, None]])  # views (B, 1, 3, r, r)
    expected = pca.values(contrib[:b])[torch.arange(b), comps]
    torch.testing.assert_close(out.metrics["alpha"], expected, atol=1e-4, rtol=1e-4)
    logp = logits[:b].log_softmax(-1)[:, 7]
    torch.testing.assert_close(out.loss, -expected - 0.5 * logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.metrics["p"], logp.exp())


# --- image sets -------------------------------------------------------------------------------


def test_digits_image_set_labels_limit_and_seeded_patch():
    from digin.core.digits.data import PatchSpec, patch_present

    spec = ImageSetSpec.model_validate({"digits": "train", "patch": {"rate": 0.5, "seed": 3}})
    s = load_image_set(spec, size=16, class_index=7, class_name="seven")
    assert s.images.shape[1:] == (3, 16, 16) and bool((s.labels == 7).all())
    assert int(s.patched.sum()) == round(0.5 * len(s))  # exactly the rate, a seeded choice
    assert torch.equal(patch_present(s.images, PatchSpec()), s.patched)
    again = load_image_set(spec, size=16, class_index=7, class_name="seven")
    assert torch.equal(again.patched, s.patched) and torch.equal(again.images, s.images)
    others = load_image_set(
        ImageSetSpec.model_validate({"digits": "test", "labels": "other", "limit": 30}),
        size=32,
        class_index=7,
        class_name="seven",
    )
    assert len(others) == 30 and bool((others.labels != 7).all())
    assert others.images.shape == (30, 3, 32, 32) and not bool(others.patched.any())
    assert others.names[0].startswith("digits:test/")


def _png(color, size=(40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_image_set_per_class_and_resolver(tmp_path):
    folder = tmp_path / "seven"
    folder.mkdir()
    (folder / "b.png").write_bytes(_png((255, 0, 0)))
    (folder / "a.png").write_bytes(_png((0, 0, 255)))
    (folder / "notes.txt").write_text("not an image")
    spec = ImageSetSpec.model_validate(str(tmp_path / "{class}"))
    s = load_image_set(spec, size=16, class_index=7, class_name="seven")
    assert s.names == ["a.png", "b.png"] and s.images.shape == (2, 3, 16, 16)
    assert s.images[0, 2].min() == 1.0 and s.images[1, 0].min() == 1.0  # blue, then red
    assert s.labels is None and s.patched is None

    ids = ImageSetSpec.model_validate({"image_ids": ["img-1", "img-2"]})
    with pytest.raises(ValueError, match=r"spurious\.image_ids: .*resolved by the service"):
        load_image_set(ids, size=16, class_index=0, class_name="zero", field="spurious")
    uploads = {"img-1": _png((0, 255, 0)), "img-2": _png((9, 9, 9), (16, 64))}
    s = load_image_set(ids, size=16, class_index=0, class_name="zero", resolver=uploads.__getitem__)
    assert s.names == ["img-1", "img-2"] and s.images.shape == (2, 3, 16, 16)

    (folder / "c.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"images\.folder: c\.png: cannot read"):
        load_image_set(spec, size=16, class_index=7, class_name="seven")
    with pytest.raises(ValueError, match=r"images\.folder: .* is not a folder"):
        load_image_set(spec, size=16, class_index=3, class_name="three")


# --- params -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "raw", "message"),
    [
        ("neural_pca", {"class": 7, "top_images": 65}, r"top_images: .*less than or equal to 64"),
        ("neural_pca", {"class": 7, "components": 0}, r"components: .*greater than or equal to 1"),
        ("neural_pca", {}, r"class: Field required"),
        ("neural_pca", {"class": 7, "images": {"digits": "train", "patch": {"rate": 1.5}}},
         r"images\.patch\.rate: .*less than or equal to 1"),
        ("neural_pca", {"class": 7, "images": {"digits": "valid"}},
         r"images\.digits: Input should be 'train', 'test' or 'judge'"),
        ("neural_pca", {"class": 7, "images": {"digits": "train", "limit": 10_001}},
         r"images\.limit: .*less than or equal to 10000"),
        ("neural_pca", {"class": 7, "images": {"digits": "train", "folder": "x"}},
         r"images: .*exactly one source"),
        ("neural_pca", {"class": 7, "images": {"folder": "x", "labels": "other"}},
         r"images: .*digits source only"),
        ("neural_pca", {"class": 7, "images": {"digits": "test", "patch": {"top": 14, "size": 3}}},
         r"images\.patch: .*must lie inside the 16x16"),
        ("neural_pca", {"class": 7, "visualization": {"components": 17}},
         r"visualization\.components: .*less than or equal to 16"),
        ("pca_component", {"pca": "r.json", "components": [-1]},
         r"components\.0: .*greater than or equal to 0"),
        ("pca_component", {"pca": "r.json", "components": list(range(65))},
         r"components: .*at most 64"),
        ("pca_component", {"pca": "r.json", "keep_class": -1},
         r"keep_class: .*greater than or equal to 0"),
        ("pca_component", {"pca": {"mean": [0.0, 1.0], "components": [[1.0]]}},
         r"pca\.data: .*do not have 2 entries"),
        ("pca_component", {}, r"pca: Field required"),
        ("spurious_score", {"classes": [7]}, r"spurious: Field required"),
        ("spurious_score", {"classes": [], "spurious": "digits:test"},
         r"classes: List should have at least 1 item"),
    ],
)  # fmt: skip
def test_bad_params_name_the_field_and_the_limit(kind, raw, message):
    with pytest.raises(ParamsError, match=message):
        validate_params(kind, raw)


def test_params_defaults_and_shorthands():
    p = validate_params("neural_pca", {"class": "seven", "images": "digits:test"})
    dumped = p.model_dump(mode="json")
    assert dumped["class"] == "seven" and dumped["images"]["digits"] == "test"
    assert dumped["visualization"]["guidance"]["ddim_steps"] == 5  # the zoo's settings
    assert dumped["visualization"]["prompt"] == "a handwritten digit {class}"
    assert validate_params("neural_pca", dumped).model_dump(mode="json") == dumped  # round trip
    s = validate_params("spurious_score", {"classes": [1], "spurious": "/data/{class}"})
    assert s.spurious.folder == "/data/{class}" and s.class_images.digits == "test"
    c = validate_params("pca_component", {"pca": "out/result.json"})
    assert c.components == [0] and c.keep_class == 0.5 and c.class_ is None


def test_pca_component_checks_the_pca_against_the_classifier(cache, tmp_path):
    pca = {"classifier": "digits:cnn", "class_index": 7, "mean": [0.0] * 64,
           "components": np.eye(64)[:3].tolist()}  # fmt: skip
    with pytest.raises(ValueError, match=r"class: 'three' is class 3, but the PCA is of class 7"):
        run_job("pca_component", validate_params("pca_component", {"pca": pca, "class": "three"}),
                          cache=cache)  # fmt: skip
    with pytest.raises(ValueError, match=r"components: must be < 3"):
        run_job("pca_component", validate_params("pca_component", {"pca": pca, "components": [3]}),
                          cache=cache)  # fmt: skip
    small = {**pca, "mean": [0.0] * 8, "components": [[1.0] * 8]}
    with pytest.raises(ValueError, match=r"pca: the PCA has 8 features, digits:cnn has 64"):
        run_job("pca_component", validate_params("pca_component", {"pca": small}), cache=cache)
    with pytest.raises(ValueError, match="classifier: the PCA names no classifier"):
        run_job(
            "pca_component",
            validate_params("pca_component", {"pca": {**pca, "classifier": None}}),
            cache=cache,
        )
    with pytest.raises(ValueError, match="pca: .* not found"):
        load_pca(str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text('{"kind": "guided"}')
    with pytest.raises(ValueError, match="is not a neural_pca result"):
        load_pca(str(tmp_path / "other.json"))
