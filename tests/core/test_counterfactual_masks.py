"""Mask refinement of counterfactuals (digin.core.counterfactual.masks): SAM prompts from the
cross-attention mask, post-processing with known answers, and the tiny SAM / SAM-HQ models."""

from __future__ import annotations

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.counterfactual.masks import (
    dilate,
    erode,
    foreground_mask,
    gaussian_blur,
    latent_mask,
    postprocess,
    refine_with_sam,
    sam_box,
    sam_points,
)
from digin.core.loaders import load_segmenter
from digin.core.tiny import save_tiny_sam


def _square(side: int, top: int, left: int, size: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, side, side)
    mask[..., top : top + size, left : left + size] = 1.0
    return mask


def test_dilation_grows_and_erosion_shrinks_by_half_the_kernel():
    dot = _square(9, 4, 4, 1)
    assert torch.equal(dilate(dot, 3), _square(9, 3, 3, 3))
    assert torch.equal(erode(_square(9, 2, 2, 5), 3), _square(9, 3, 3, 3))
    assert torch.equal(erode(dot, 3), torch.zeros_like(dot))
    ones = torch.ones(1, 1, 6, 6)
    assert torch.equal(erode(ones, 5), ones)  # pixels outside the image do not count
    assert torch.equal(dilate(dot, 1), dot) and torch.equal(erode(dot, 1), dot)


def test_blur_keeps_constants_and_mass_and_is_symmetric():
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 8, 8), 0.7), 5, 2.0), torch.tensor(0.7))
    dot = _square(21, 10, 10, 1)
    blurred = gaussian_blur(dot, 7, 1.5)
    assert torch.isclose(blurred.sum(), torch.tensor(1.0), atol=1e-5)  # far from the borders
    assert torch.allclose(blurred, blurred.flip(-1)) and torch.allclose(blurred, blurred.mT)
    assert blurred[0, 0, 10, 10] == blurred.max() and blurred[0, 0, 10, 14] == 0.0  # 7 wide
    assert torch.equal(gaussian_blur(dot, 1, 1.0), dot)


@pytest.mark.parametrize(
    ("side", "sizes"),
    [(512, (3, 20, 45, 30.0)), (64, (1, 3, 5, 3.75)), (16, (1, 1, 1, 0.9375))],
)
def test_post_processing_sizes_are_the_official_ones_at_512_px_and_scale(side, sizes):
    _, used = postprocess(_square(side, 0, 0, side // 2), CounterfactualConfig())
    assert (used["erosion"], used["dilation"], used["blur"], used["blur_sigma"]) == sizes


def test_post_processing_off_and_on():
    mask = _square(64, 16, 16, 24)
    off = CounterfactualConfig(mask_erosion=0, mask_dilation=0, mask_blur=0)
    assert torch.equal(postprocess(mask, off)[0], mask)
    out, _ = postprocess(mask, CounterfactualConfig())  # erosion 1, dilation 3, blur 5 at 64 px
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[0, 0, 28, 28] == 1.0 and out[0, 0, 0, 0] == 0.0  # inside / far outside
    assert 0.0 < out[0, 0, 15, 28] < 1.0  # the dilated, blurred edge
    assert out.sum() > mask.sum()  # dilation wins over the 1 px (identity) erosion


def test_mask_settings_are_validated_naming_the_field():
    adapter = TypeAdapter(CounterfactualConfig)
    for bad, field in (({"mask_blur": 44}, "mask_blur"), ({"sam_points": 0}, "sam_points"),
                       ({"sam_prompt": "mask"}, "sam_prompt")):  # fmt: skip
        with pytest.raises(ValidationError, match=field):
            adapter.validate_python(bad)


def test_latent_mask_is_the_resized_pixel_mask():
    pixel = _square(64, 0, 0, 32)
    latent = latent_mask(pixel, 32)
    assert latent.shape == (1, 1, 32, 32)
    assert torch.allclose(latent[..., :15, :15], torch.tensor(1.0))  # the edge row mixes
    assert torch.allclose(latent[..., 17:, :], torch.tensor(0.0))
    assert torch.isclose(latent.mean(), pixel.mean())
    assert torch.equal(latent_mask(pixel, 64), pixel)  # pixel-space models: the same mask


def test_sam_points_lie_above_the_threshold_are_distinct_and_seeded():
    mask = _square(32, 4, 20, 6) * 0.9 + _square(32, 20, 2, 4) * 0.5
    points = sam_points(mask, 5, 0.35, torch.Generator().manual_seed(1))
    assert points is not None and points.shape == (5, 2)
    assert all(mask[0, 0, int(y), int(x)] > 0.35 for x, y in points)
    assert len({tuple(p.tolist()) for p in points}) == 5
    again = sam_points(mask, 5, 0.35, torch.Generator().manual_seed(1))
    assert torch.equal(points, again)
    assert sam_points(mask, 5, 0.95, torch.Generator()) is None  # nothing above the threshold
    few = sam_points(_square(8, 0, 0, 2), 10, 0.5, torch.Generator().manual_seed(0))
    assert few is not None and few.shape == (4, 2)  # at most the pixels there are


def test_sam_box_spans_the_quantiles():
    mask = _square(32, 4, 10, 8)  # rows 4..11, columns 10..17
    assert sam_box(mask, 0.5, 1.0).tolist() == [10.0, 4.0, 17.0, 11.0]
    inner = sam_box(mask, 0.5, 0.75)
    assert inner is not None and 10 < inner[0] < inner[2] < 17 and 4 < inner[1] < inner[3] < 11
    assert sam_box(torch.zeros(1, 1, 8, 8), 0.5, 0.97) is None


@pytest.fixture(scope="module")
def image():
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(small, size=(32, 32), mode="bicubic").clamp(0, 1)


@pytest.mark.parametrize("hq", [True, False])
def test_tiny_sam_and_sam_hq_segment_from_points_and_boxes(tmp_path, image, hq):
    save_tiny_sam(tmp_path / "sam", seed=0, hq=hq)
    segmenter = load_segmenter(f"sam:{tmp_path / 'sam'}")
    assert segmenter.hq is hq
    for prompt in ({"points": torch.tensor([[5.0, 6.0], [20.0, 25.0]])},
                   {"box": torch.tensor([2.0, 3.0, 28.0, 30.0])}):  # fmt: skip
        out = segmenter.segment(image, **prompt)
        assert out.shape == (1, 1, 32, 32) and set(out.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(out, segmenter.segment(image, **prompt))  # deterministic
    with pytest.raises(ValueError, match="points or a box"):
        segmenter.segment(image)


def test_sam_refinement_in_the_mask_step(tiny_models, image):
    segmenter = load_segmenter(tiny_models["segmenter"])
    attention = torch.zeros(8, 8)
    attention[2:6, 3:7] = 1.0
    cf = CounterfactualConfig(mask_erosion=0, mask_dilation=0, mask_blur=0)
    gen = torch.Generator().manual_seed(0)
    latent, pixel, record = foreground_mask(
        attention, image, cf, latent_side=16, segmenter=segmenter, generator=gen
    )
    info = record["segmenter"]
    assert info["spec"] == tiny_models["segmenter"] and len(info["points"]) == 5
    sam = segmenter.segment(image, points=torch.tensor(info["points"]))
    if info["kept_attention"] is None:
        assert torch.equal(pixel, sam)
    assert latent.shape == (1, 1, 16, 16)
    assert torch.allclose(latent, latent_mask(pixel, 16))
    # no pixel above the threshold: the cross-attention mask stays, and the record says why
    faint = torch.full((1, 1, 32, 32), 0.2)
    kept, why = refine_with_sam(segmenter, image, faint, cf, gen)
    assert kept is faint and why["kept_attention"] == "no pixel above 0.35"
    box_cf = CounterfactualConfig(sam_prompt="box")
    _, box_info = refine_with_sam(segmenter, image, _square(32, 4, 4, 10), box_cf, gen)
    assert box_info["prompt"] == "box" and len(box_info["box"]) == 4
