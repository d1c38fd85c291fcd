"""The model registry (docs/architecture.md §6.1): spec parsing, the curated list,
availability, allow-lists."""

from __future__ import annotations

import pytest

from digin.core.registry import (
    SCHEMES,
    ZOO_DIR,
    ZOO_ENV,
    ModelSpec,
    hf_hub_cache,
    is_allowed,
    is_available,
    list_models,
    list_schemes,
    names_server_path,
    parse_spec,
    weights_source,
    zoo_dir,
)


@pytest.mark.parametrize(
    ("spec", "expected", "kind"),
    [
        (
            "diffusers:CompVis/stable-diffusion-v1-4",
            ModelSpec("diffusers", "CompVis/stable-diffusion-v1-4"),
            "diffusion",
        ),
        ("diffusers:tiny-models/sd", ModelSpec("diffusers", "tiny-models/sd"), "diffusion"),
        ("timm:resnet50", ModelSpec("timm", "resnet50", arch="resnet50"), "classifier"),
        (
            "timm:vit_base_patch16_384.augreg_in21k_ft_in1k",
            ModelSpec(
                "timm",
                "vit_base_patch16_384.augreg_in21k_ft_in1k",
                arch="vit_base_patch16_384.augreg_in21k_ft_in1k",
            ),
            "classifier",
        ),
        (
            "timm:test_resnet@tiny-models/classifier.safetensors",
            ModelSpec(
                "timm",
                "test_resnet@tiny-models/classifier.safetensors",
                arch="test_resnet",
                weights="tiny-models/classifier.safetensors",
            ),
            "classifier",
        ),
        (
            "timm:resnet50@s3://bucket/ft/model.safetensors",
            ModelSpec(
                "timm",
                "resnet50@s3://bucket/ft/model.safetensors",
                arch="resnet50",
                weights="s3://bucket/ft/model.safetensors",
            ),
            "classifier",
        ),
        (
            "open_clip:ViT-B-16/laion2b_s34b_b88k",
            ModelSpec(
                "open_clip",
                "ViT-B-16/laion2b_s34b_b88k",
                arch="ViT-B-16",
                weights="laion2b_s34b_b88k",
            ),
            "classifier",
        ),
        (  # split at the first '/': the tag may be a local weights file
            "open_clip:tiny-clip/tiny-models/open_clip/tiny-clip.safetensors",
            ModelSpec(
                "open_clip",
                "tiny-clip/tiny-models/open_clip/tiny-clip.safetensors",
                arch="tiny-clip",
                weights="tiny-models/open_clip/tiny-clip.safetensors",
            ),
            "classifier",
        ),
        ("digits", ModelSpec("digits", "", arch="digits"), "diffusion"),
        (
            "digits@/zoos/v2",
            ModelSpec("digits", "", arch="digits", weights="/zoos/v2"),
            "diffusion",
        ),
        (
            "digits:cnn-spurious",
            ModelSpec("digits", "cnn-spurious", arch="cnn-spurious"),
            "classifier",
        ),
        (
            "digits:mlp@my zoo",
            ModelSpec("digits", "mlp@my zoo", arch="mlp", weights="my zoo"),
            "classifier",
        ),
    ],
)
def test_parse_spec(spec, expected, kind):
    parsed = parse_spec(spec)
    assert parsed == expected
    assert parsed.kind == kind
    assert str(parsed) == spec


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "resnet50",
        "torchvision:resnet50",
        "timm:",
        "timm:@weights.safetensors",
        "timm:resnet50@",
        "timm:resnet50@weights.pt",
        "open_clip:ViT-B-16",
        "open_clip:/laion2b_s34b_b88k",
        "open_clip:ViT-B-16/",
        "digits:",
        "digits:Big CNN",
        "digits:resnet",
        "digits@",
        "digits:cnn@",
        "digits:cnn@ /zoo",
        " timm:resnet50",
    ],
)
def test_parse_spec_rejects_bad_specs_clearly(spec):
    with pytest.raises(ValueError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert all(scheme in message for scheme in SCHEMES)


def test_pickled_timm_weights_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match=r"\.safetensors"):
        parse_spec("timm:resnet50@model.pth")


CURATED = {
    "diffusers:CompVis/stable-diffusion-v1-4",
    "diffusers:stable-diffusion-v1-5/stable-diffusion-v1-5",
    "diffusers:stabilityai/stable-diffusion-2-1-base",
    "diffusers:stabilityai/stable-diffusion-xl-base-1.0",
    "timm:vit_base_patch16_384.augreg_in21k_ft_in1k",
    "timm:vit_large_patch16_224",
    "timm:seresnet152d.ra2_in1k",
    "timm:resnet50.a1_in1k",
    "timm:convnext_base.fb_in22k_ft_in1k",
    "open_clip:ViT-B-16/laion2b_s34b_b88k",
    "open_clip:ViT-B-32/laion2b_s34b_b79k",
    "blip:Salesforce/blip-image-captioning-large",
    "blip:Salesforce/blip-image-captioning-base",
    "sam:syscv-community/sam-hq-vit-huge",
    "sam:syscv-community/sam-hq-vit-base",
    "sam:facebook/sam-vit-base",
}
DIGITS = {"digits", "digits:cnn", "digits:mlp", "digits:cnn-spurious", "digits:judge"}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, so results do not depend on this machine's cache."""
    for var in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def fake_download(cache, repo_id):
    (cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abc").mkdir(parents=True)


def test_curated_models_parse_and_are_well_formed(hub_cache):
    models = list_models()
    assert {m.spec for m in models} == CURATED | DIGITS
    for m in models:
        assert parse_spec(m.spec).kind == m.kind
        assert m.resolution and m.resolution > 0
        assert (m.num_classes is None) == (m.kind != "classifier")
        if m.spec in CURATED:
            assert m.source and m.source.startswith("hf-hub:")
            assert not m.available  # the cache is empty
        else:  # the bundled zoo, shipped with the package
            assert m.source == str(ZOO_DIR / f"{parse_spec(m.spec).arch}.safetensors")
            assert m.available


def test_digits_specs_read_the_zoo_folder_of_the_spec_or_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv(ZOO_ENV, raising=False)
    assert zoo_dir() == ZOO_DIR
    assert weights_source("digits:judge") == str(ZOO_DIR / "judge.safetensors")
    monkeypatch.setenv(ZOO_ENV, str(tmp_path))
    assert zoo_dir() == tmp_path
    assert weights_source("digits") == str(tmp_path / "digits.safetensors")
    assert not is_available("digits:cnn")  # nothing trained there
    assert {m.spec for m in list_models() if m.available} == set()
    assert weights_source(f"digits:cnn@{ZOO_DIR}") == str(ZOO_DIR / "cnn.safetensors")
    assert is_available(f"digits:cnn@{ZOO_DIR}")  # '@' wins over the setting


def test_schemes_section_covers_every_scheme():
    assert [s.scheme for s in list_schemes()] == list(SCHEMES)
    forms = [form for s in list_schemes() for form in s.forms]
    assert "timm:<arch>@<file.safetensors>" in forms
    assert "diffusers:<local dir>" in forms


def test_available_when_the_hub_cache_holds_a_snapshot(hub_cache):
    (hub_cache / "models--timm--resnet50.a1_in1k").mkdir(parents=True)  # an aborted download
    assert not is_available("timm:resnet50.a1_in1k")
    fake_download(hub_cache, "timm/resnet50.a1_in1k")
    fake_download(hub_cache, "timm/vit_large_patch16_224.augreg_in21k_ft_in1k")
    available = {m.spec for m in list_models() if m.available}
    assert available == {"timm:resnet50.a1_in1k", "timm:vit_large_patch16_224"} | DIGITS


def test_hub_cache_location_follows_huggingface_env(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf_hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hf_hub_cache() == tmp_path / "cache"


def test_availability_of_uncurated_specs(hub_cache, tmp_path):
    pipeline = tmp_path / "my-sd"
    weights = tmp_path / "ft.safetensors"
    assert weights_source(f"diffusers:{pipeline}") == str(pipeline)
    assert not is_available(f"diffusers:{pipeline}")
    pipeline.mkdir()
    weights.write_bytes(b"")
    assert is_available(f"diffusers:{pipeline}")
    assert is_available(f"timm:resnet18@{weights}")
    assert weights_source("diffusers:someone/their-sd") == "hf-hub:someone/their-sd"
    assert weights_source("timm:resnet18.a1_in1k") == "hf-hub:timm/resnet18.a1_in1k"
    assert weights_source("timm:resnet18") is None  # the default tag is timm's to know
    assert not is_available("timm:resnet18@s3://bucket/ft.safetensors")  # remote
    fake_download(hub_cache, "someone/their-sd")
    assert is_available("diffusers:someone/their-sd")


def test_is_allowed():
    assert is_allowed("timm:anything", None)
    assert not is_allowed("timm:resnet50.a1_in1k", [])
    allow = ["digits*", "timm:resnet50.a1_in1k", "diffusers:stabilityai/*"]
    assert is_allowed("timm:resnet50.a1_in1k", allow)
    assert not is_allowed("timm:resnet50.a1_in1k@x.safetensors", allow)
    assert is_allowed("digits", allow)
    assert is_allowed("digits:cnn", allow)
    assert is_allowed("diffusers:stabilityai/stable-diffusion-2-1-base", allow)
    assert not is_allowed("diffusers:CompVis/stable-diffusion-v1-4", allow)
    assert is_allowed("open_clip:ViT-B-16/laion2b_s34b_b88k", ["*"])
    with pytest.raises(TypeError):
        is_allowed("timm:resnet50", "timm:*")


@pytest.mark.parametrize(
    ("spec", "local"),
    [
        ("digits", False),
        ("digits:cnn", False),
        ("digits:cnn@/srv/zoo", True),
        ("digits@zoo", True),
        ("diffusers:CompVis/stable-diffusion-v1-4", False),
        ("diffusers:/models/sd", True),
        ("diffusers:./sd", True),
        ("timm:resnet50.a1_in1k", False),
        ("timm:resnet50@/weights/ft.safetensors", True),
        ("timm:resnet50@s3://bucket/ft.safetensors", False),
        ("open_clip:ViT-B-16/laion2b_s34b_b88k", False),
        ("open_clip:ViT-B-16/weights/clip.safetensors", True),
        ("blip:Salesforce/blip-image-captioning-large", False),
        ("blip:/models/blip", True),
        ("sam:syscv-community/sam-hq-vit-huge", False),
        ("sam:./sam", True),
    ],
)
def test_names_server_path(spec, local):
    assert names_server_path(spec) is local
