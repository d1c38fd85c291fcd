"""Captioner and segmenter model kinds (docs/architecture.md §5.3, §5.6, §6): their specs, the
tiny BLIP captioner, and a counterfactual job on the tiny Stable Diffusion that captions its
image and refines its mask with the tiny SAM-HQ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from digin.core.context import RunContext
from digin.core.counterfactual.attention import find_words
from digin.core.counterfactual.job import run_counterfactual
from digin.core.jobs import ModelCache
from digin.core.loaders import load_captioner, load_classifier, load_diffusion, load_segmenter
from digin.core.params import CounterfactualParams
from digin.core.registry import (
    ModelSpec,
    check_model_roots,
    list_models,
    list_schemes,
    local_paths,
    parse_spec,
    weights_source,
)

RES = 32
FAST = {"ddim_steps": 3, "iterations": 1, "loss_steps": 2, "num_cutouts": 2, "lr": 0.05}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("spec", "kind", "local"),
    [
        ("blip:Salesforce/blip-image-captioning-large", "captioner", []),
        ("blip:/models/blip", "captioner", ["/models/blip"]),
        ("sam:syscv-community/sam-hq-vit-huge", "segmenter", []),
        ("sam:./sam-hq", "segmenter", ["./sam-hq"]),
    ],
)
def test_captioner_and_segmenter_specs(spec, kind, local):
    parsed = parse_spec(spec)
    assert parsed == ModelSpec(spec.split(":")[0], spec.split(":", 1)[1])
    assert parsed.kind == kind and str(parsed) == spec
    assert local_paths(spec) == local
    expected = f"hf-hub:{parsed.name}" if not local else str(Path(local[0]))
    assert weights_source(spec) == expected
    if local:  # confined to the model roots like every other local model
        assert check_model_roots(spec, ["/elsewhere"]) is not None


def test_registry_lists_the_new_kinds():
    kinds = {m.spec: m.kind for m in list_models()}
    assert kinds["blip:Salesforce/blip-image-captioning-large"] == "captioner"
    assert kinds["sam:syscv-community/sam-hq-vit-huge"] == "segmenter"
    schemes = {s.scheme: s.kind for s in list_schemes()}
    assert schemes["blip"] == "captioner" and schemes["sam"] == "segmenter"
    with pytest.raises(ValueError, match="nothing after 'sam:'"):
        parse_spec("sam:")


def test_loaders_check_the_kind_and_the_folder(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="names a segmenter model, not a captioner"):
        load_captioner(tiny_models["segmenter"])
    with pytest.raises(ValueError, match="names a captioner model, not a classifier"):
        load_classifier(tiny_models["captioner"])
    with pytest.raises(ValueError, match="names a segmenter, not a diffusion model"):
        load_diffusion(tiny_models["segmenter"])
    with pytest.raises(FileNotFoundError, match="segmenter folder"):
        load_segmenter(f"sam:{tmp_path / 'missing'}")
    folder = tiny_models["captioner"].removeprefix("blip:")
    with pytest.raises(ValueError, match="model_type 'blip' is not a segmenter"):
        load_segmenter(f"sam:{folder}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_captioner(f"blip:{tmp_path / 'empty'}")


def test_the_captioner_continues_the_prompt(tiny_models):
    captioner = load_captioner(tiny_models["captioner"])
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    prompt = "a photograph of a Great White Shark"
    caption = captioner.continue_caption(image, prompt, max_new_tokens=6, num_beams=2)
    assert caption.startswith(prompt) and caption != prompt  # as given, case kept
    assert len(caption.removeprefix(prompt).split()) <= 6  # at most 6 word pieces more
    assert caption == captioner.continue_caption(image, prompt, max_new_tokens=6, num_beams=2)
    other = captioner.continue_caption(1 - image, prompt, max_new_tokens=6, num_beams=2)
    assert other != caption  # it looks at the image
    for text in (caption, other):  # the start class stays a whole word (no '##' piece after it)
        assert find_words(text, "great white shark") == (18, 35)
    with pytest.raises(ValueError, match="one RGB image"):
        captioner.continue_caption(image[0], prompt, max_new_tokens=6, num_beams=2)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 5, 6, generator=gen)
    pixels = torch.nn.functional.interpolate(small, size=(40, 48), mode="bicubic").clamp(0, 1)
    path = tmp_path_factory.mktemp("images") / "start.png"
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


def _run(params: dict, cache: ModelCache):
    return run_counterfactual(CounterfactualParams.model_validate(params), RunContext(cache=cache))


def test_a_counterfactual_captions_its_image_and_refines_its_mask_with_sam(tiny_models, image_file):
    cache = ModelCache()
    params = {
        "image": str(image_file),
        "diffusion": tiny_models["sd"],
        "classifier": tiny_models["classifier"],
        "captioner": tiny_models["captioner"],
        "segmenter": tiny_models["segmenter"],
        "resolution": RES,
        "start_class": "tench",
        "targets": ["goldfish"],
        "guidance": FAST,
        "counterfactual": {"p2p_fractions": [0.3], "caption_max_tokens": 5, "caption_beams": 1},
    }
    result = _run(params, cache)
    summary = result.summary()
    assert summary["caption_source"] == "captioner"
    assert result.caption.startswith("a photograph of a tench ")
    assert result.items[0].prompt == result.caption.replace("tench", "goldfish", 1)
    assert summary["models"]["captioner"] == tiny_models["captioner"]
    assert summary["models"]["segmenter"] == tiny_models["segmenter"]
    sam = summary["mask"]["segmenter"]
    assert sam["prompt"] == "points" and len(sam["points"]) == 5
    assert summary["mask"]["postprocessing"] == {
        "erosion": 1, "dilation": 1, "blur": 3, "blur_sigma": 1.875
    }  # fmt: skip
    assert result.latent_mask.shape == (1, 1, 16, 16) and result.pixel_mask.shape[-1] == RES
    assert summary["timings"]["caption_s"] > 0
    artifacts = result.render_artifacts()
    assert artifacts["caption.txt"].decode() == result.caption + "\n"
    assert json.loads(json.dumps(summary))["caption"] == result.caption

    # A given caption wins over the captioner (not loaded, not recorded); the same caption
    # shares the inversion.
    again = _run({**params, "caption": result.caption, "segmenter": None}, cache)
    assert again.caption_source == "given" and again.inversion_cached
    assert "captioner" not in again.models and "segmenter" not in again.models
    assert "segmenter" not in again.summary()["mask"]


def test_the_cost_estimate_counts_the_caption_and_the_mask_once_per_image():
    from digin.core.limits import COST_BY_KIND

    base = {"image": "a.png", "targets": [1, 2]}

    def cost(**extra):
        params = CounterfactualParams.model_validate({**base, **extra}).model_dump(mode="json")
        return COST_BY_KIND["counterfactual"](params)

    plain = cost()
    blip, sam = "blip:Salesforce/blip-image-captioning-base", "sam:syscv-community/sam-hq-vit-huge"
    both = cost(captioner=blip, segmenter=sam)
    assert both.value == plain.value + 20 * 3 * 384**2 + 1024**2  # tokens x beams; one mask
    assert both.terms[-2:] == (
        "60 captioner steps x 384² pixels",
        "1 segmented image x 1024² pixels",
    )
    assert (
        cost(captioner=blip, caption="a photograph of a zero").value
        == cost(caption="a photograph of a zero").value
    )  # a given caption: the captioner does not run
