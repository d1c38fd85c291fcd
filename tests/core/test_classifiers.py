"""Classifier loaders and the shared interface (digin.core.classifiers) on tiny random models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from digin.core import loaders
from digin.core.classes import imagenet_class_names
from digin.core.classifiers import ClipClassifier, TimmClassifier
from digin.core.loaders import load_classifier


def _weights_path(spec: str) -> Path:
    return Path(spec.partition("@")[2])


def _clip_path(spec: str) -> Path:
    return Path(spec.removeprefix("open_clip:").partition("/")[2])


def _images(n: int, r: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(seed))  # in [0, 1]


def _check_interface(clf, k: int) -> None:
    """The contract every classifier keeps."""
    r = clf.input_size
    x = _images(3, r).requires_grad_(True)
    logits, feats = clf.forward_features(x)
    assert logits.shape == (3, k) and logits.dtype == torch.float32
    w, b = clf.last_layer_weight, clf.last_layer_bias
    assert w.shape == (k, feats.shape[1])
    expected = feats @ w.T + (0 if b is None else b)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(clf(x), logits, atol=1e-5, rtol=0)
    # frozen, but differentiable w.r.t. the input
    assert not clf.training
    assert not any(p.requires_grad for p in clf.parameters())
    logits[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # stays in eval mode when a parent module trains
    torch.nn.ModuleList([clf]).train()
    assert not clf.training and not any(m.training for m in clf.modules())
    with pytest.raises(ValueError, match=rf"expects images of shape \(N, 3, {r}, {r}\)"):
        clf(_images(1, r + 1))


# --- timm ------------------------------------------------------------------------------------


def test_timm_file_with_sidecar(tiny_models):
    clf = load_classifier(tiny_models["classifier"])
    assert isinstance(clf, TimmClassifier)
    assert clf.spec == tiny_models["classifier"]
    assert clf.class_names == imagenet_class_names()[:10]  # from the sidecar
    assert clf.input_size == 32  # the sidecar overrides timm's 160
    assert clf.mean == clf.std == (0.5, 0.5, 0.5)  # test_resnet's own
    _check_interface(clf, 10)


def test_timm_logits_are_the_models_own(tiny_models):
    clf = load_classifier(tiny_models["classifier"])
    x = _images(2, 32)
    torch.testing.assert_close(clf(x), clf.model((x - 0.5) / 0.5))


def _tiny_resnet(folder: Path, k: int, sidecar: dict | None = None) -> str:
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=k)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "weights.safetensors")
    if sidecar is not None:
        (folder / "weights.json").write_text(json.dumps(sidecar))
    return f"timm:test_resnet@{folder / 'weights.safetensors'}"


def test_timm_class_count_from_weights(tmp_path):
    spec = _tiny_resnet(tmp_path, 7)
    clf = load_classifier(spec)
    assert clf.num_classes == 7
    assert clf.class_names == [f"class_{i}" for i in range(7)]
    assert clf.input_size == 160  # timm's default config without a sidecar
    names = list("abcdefg")
    assert load_classifier(spec, class_names=names).class_names == names
    with pytest.raises(ValueError, match="got 3 class names for a 7-class model"):
        load_classifier(spec, class_names=["a", "b", "c"])


def test_timm_sidecar_mean_std_and_model_kwargs(tmp_path):
    sidecar = {"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3], "model_kwargs": {"drop_rate": 0.5}}
    clf = load_classifier(_tiny_resnet(tmp_path, 4, sidecar))
    assert clf.mean == (0.1, 0.2, 0.3) and clf.std == (1.0, 2.0, 3.0)
    assert clf.model.drop_rate == 0.5
    _check_interface(clf, 4)


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ({"class_names": ["a", "b"]}, "got 2 class names for a 4-class model"),
        ({"classes": ["a"]}, r"unknown keys \['classes'\]"),
        ({"class_names": "abcd"}, "class_names must be a list of non-empty strings"),
        ({"input_size": 0}, "input_size must be a positive integer"),
        ({"input_size": 32.5}, "input_size must be a positive integer"),
        ({"mean": [0.5, 0.5]}, "mean must be a list of 3 numbers"),
        ({"std": [0.5, 0, 0.5]}, "std must be positive"),
        ({"model_kwargs": [1]}, "model_kwargs must be a JSON object"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_timm_sidecar_errors(tmp_path, sidecar, message):
    spec = _tiny_resnet(tmp_path, 4, sidecar)
    with pytest.raises(ValueError, match=message):
        load_classifier(spec)


def test_timm_sidecar_bad_json(tmp_path):
    spec = _tiny_resnet(tmp_path, 4)
    (tmp_path / "weights.json").write_text("{not json")
    with pytest.raises(ValueError, match="weights.json is not valid JSON"):
        load_classifier(spec)


def test_timm_weights_of_another_architecture(tiny_models, tmp_path):
    weights = _weights_path(tiny_models["classifier"])
    with pytest.raises(ValueError, match=r"has no 'head.weight' tensor .*'test_vit'"):
        load_classifier(f"timm:test_vit@{weights}")
    with pytest.raises(ValueError, match="the weights do not fit timm 'resnet18'"):
        load_classifier(f"timm:resnet18@{weights}")
    with pytest.raises(ValueError, match="unknown timm architecture 'no_such_net'"):
        load_classifier(f"timm:no_such_net@{weights}")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_timm_refuses_pickles(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        load_classifier(f"timm:test_resnet@{path}")


def test_timm_refuses_uris_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="only local weight files are supported"):
        load_classifier("timm:resnet50@s3://bucket/models/ft.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_classifier(f"timm:test_resnet@{tmp_path / 'absent.safetensors'}")


# --- open_clip -------------------------------------------------------------------------------


@pytest.mark.parametrize("templates", ["openai", "simple"])
def test_open_clip_zero_shot(tiny_models, templates):
    names = ["tench", "goldfish", "church"]
    clf = load_classifier(tiny_models["open_clip"], class_names=names, clip_templates=templates)
    assert isinstance(clf, ClipClassifier)
    assert clf.class_names == names
    assert clf.input_size == 32
    assert clf.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert clf.last_layer_bias is None
    torch.testing.assert_close(clf.last_layer_weight.norm(dim=1), torch.full((3,), 100.0))
    _, feats = clf.forward_features(_images(2, 32))
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2))
    _check_interface(clf, 3)


def test_open_clip_logits_are_100_cos(tiny_models):
    """Known answer with the single template: 100 · cos(image, 'a photo of a <name>.')."""
    names = ["tench", "goldfish"]
    clf = load_classifier(tiny_models["open_clip"], class_names=names, clip_templates="simple")
    tokens = open_clip.get_tokenizer("tiny-clip")([f"a photo of a {n}." for n in names])
    with torch.no_grad():
        text = F.normalize(clf.model.encode_text(tokens), dim=-1)  # (2, D)
        x = _images(2, 32)
        image = F.normalize(clf.model.encode_image((x - clf._mean) / clf._std), dim=-1)
        torch.testing.assert_close(clf(x), 100 * image @ text.T, atol=1e-4, rtol=0)


def test_open_clip_templates_differ_and_are_cached(tiny_models):
    spec = tiny_models["open_clip"]
    names = ["tench", "goldfish"]
    simple = load_classifier(spec, class_names=names, clip_templates="simple")
    openai = load_classifier(spec, class_names=names, clip_templates="openai")
    assert not torch.allclose(simple.last_layer_weight, openai.last_layer_weight)
    cached = len(loaders._TEXT_EMBEDDINGS)
    again = load_classifier(spec, class_names=names, clip_templates="simple")
    assert len(loaders._TEXT_EMBEDDINGS) == cached
    torch.testing.assert_close(again.last_layer_weight, simple.last_layer_weight)


def test_open_clip_default_names_are_imagenet(tiny_models):
    clf = load_classifier(tiny_models["open_clip"], clip_templates="simple")
    assert clf.class_names == imagenet_class_names()
    assert clf.last_layer_weight.shape == (1000, 16)


def test_open_clip_errors(tiny_models, tmp_path):
    weights = _clip_path(tiny_models["open_clip"])
    with pytest.raises(ValueError, match="clip_templates must be 'openai' or 'simple'"):
        load_classifier(tiny_models["open_clip"], clip_templates="fancy")
    # a weights file without its <arch>.json config beside it
    lonely = tmp_path / "other-clip.safetensors"
    shutil.copy(weights, lonely)
    with pytest.raises(ValueError, match="unknown open_clip architecture 'other-clip'"):
        load_classifier(f"open_clip:other-clip/{lonely}")
    with pytest.raises(ValueError, match=r"weights must be a \.safetensors file"):
        load_classifier(f"open_clip:tiny-clip/{tmp_path / 'tiny-clip.pt'}")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_classifier(f"open_clip:tiny-clip/{tmp_path / 'absent.safetensors'}")
    with pytest.raises(ValueError, match="class_names must be a sequence of non-empty strings"):
        load_classifier(tiny_models["open_clip"], class_names=[])


# --- dispatch --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["foo:bar", "resnet50", "timm:", "open_clip:ViT-B-32"])
def test_bad_specs_name_the_spec(spec):
    with pytest.raises(ValueError, match="invalid model spec") as info:
        load_classifier(spec)
    assert repr(spec) in str(info.value)


def test_foo_scheme_lists_known_schemes():
    with pytest.raises(ValueError, match="known schemes: diffusers, timm, open_clip, digits"):
        load_classifier("foo:bar")


def test_diffusion_specs_are_not_classifiers(tiny_models):
    with pytest.raises(ValueError, match="names a diffusion model, not a classifier"):
        load_classifier(tiny_models["sd"])


def test_digits_specs_load_the_zoo_classifiers():
    clf = load_classifier("digits:mlp")
    assert clf.spec == "digits:mlp" and clf.input_size == 16 and len(clf.class_names) == 10
    with pytest.raises(ValueError, match="unknown digits classifier 'vgg'"):
        load_classifier("digits:vgg")
    with pytest.raises(ValueError, match="names a diffusion model"):
        load_classifier("digits")
