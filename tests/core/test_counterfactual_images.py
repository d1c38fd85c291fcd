"""The start image of a counterfactual: validation, preprocessing, bundled digits, upload ids;
and the torch-free params of the kind."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from digin.core.counterfactual.images import (
    ImageError,
    decode_image,
    load_start_image,
    preprocess,
)
from digin.core.digits.data import load_images, make_splits
from digin.core.params import ParamsError, validate_params


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_resize_short_side_and_centre_crop():
    # 60 x 20: left third red, middle green, right blue → the centre crop is green
    image = Image.new("RGB", (60, 20))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(colour, (20 * i, 0, 20 * (i + 1), 20))
    x = preprocess(image, 10)
    assert x.shape == (1, 3, 10, 10) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 5, 5], torch.tensor([0.0, 1.0, 0.0]), atol=0.05)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_formats_pixels_and_bombs_are_refused():
    small = Image.new("RGB", (8, 8), "white")
    assert decode_image(_png(small))[1] == "PNG"
    assert decode_image(_png(small, "JPEG"))[1] == "JPEG"
    with pytest.raises(ImageError, match="accepted formats are PNG, JPEG, WEBP, BMP"):
        decode_image(_png(small, "GIF"))
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"hello")
    with pytest.raises(ImageError, match="limit is 64 pixels"):
        decode_image(_png(small.resize((9, 8))), max_pixels=64)
    with pytest.raises(ImageError, match="limit is 20 bytes"):
        decode_image(_png(small), max_bytes=20)
    # a decompression bomb: a tiny file that declares far more pixels than Pillow allows
    bomb = _png(Image.new("1", (12_000, 8_000)))
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(bomb, max_pixels=10**9)
    with pytest.raises(ImageError, match="not a valid PNG"):
        decode_image(_png(small)[:40])


def test_bundled_digits_upload_ids_and_paths(tmp_path):
    x, y = load_images()
    test = make_splits(y).test
    image = load_start_image("digits:test/17", resolution=16)
    assert image.label == int(y[test[17]]) and image.format == "digits"
    assert torch.allclose(image.pixels[0, 0], x[test[17], 0], atol=1 / 255)
    assert image.pixels.shape == (1, 3, 16, 16)
    with pytest.raises(ImageError, match="has 3"):
        load_start_image("digits:test/100000", resolution=16)
    with pytest.raises(ImageError, match="split train, judge or test"):
        load_start_image("digits:val/1", resolution=16)
    with pytest.raises(ImageError, match="only the service can resolve"):
        load_start_image(None, image_id="abc", resolution=16)
    data = _png(Image.new("RGB", (20, 20), (10, 20, 30)))
    uploaded = load_start_image(None, image_id="abc", resolution=16, resolver=lambda i: data)
    assert uploaded.source == "id:abc" and uploaded.size == (20, 20)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    from_path = load_start_image(str(path), resolution=16)
    assert from_path.sha256 == uploaded.sha256  # the key depends on the pixels only
    assert load_start_image(str(path), resolution=32).sha256 != uploaded.sha256
    with pytest.raises(ImageError, match="no such file"):
        load_start_image(str(tmp_path / "missing.png"), resolution=16)


def test_params_defaults_limits_and_errors():
    params = validate_params("counterfactual", {"image": "digits:test/0", "targets": "others"})
    assert params.prompt == "a handwritten digit {class}" and not params.image_is_path
    assert params.counterfactual.null_text_lr == 0.2  # the zoo's settings
    sd = validate_params(
        "counterfactual", {"image": "a.png", "diffusion": "diffusers:x", "targets": [3]}
    )
    assert sd.prompt == "a photograph of a {class}" and sd.image_is_path
    assert sd.guidance.ddim_steps == 20 and sd.counterfactual.latent_background_l2 == 25.0
    assert sd.counterfactual.p2p_fractions == (0.3, 0.4, 0.5)
    bad = [
        ({"targets": [1]}, "exactly one of image"),
        ({"image": "a.png", "image_id": "x", "targets": [1]}, "exactly one of image"),
        ({"image": "a.png", "targets": []}, "targets"),
        ({"image": "a.png", "targets": "all"}, "a list of classes, 'others'"),
        ({"image": "a.png", "targets": [1], "counterfactual": {"mask_cutoff": 1.0}}, "mask_cutoff"),
        ({"image": "a.png", "targets": [1], "counterfactual": {"lpips": -1}}, "lpips"),
        ({"image": "a.png", "targets": [1], "counterfactual": {"blur": 1}}, "blur"),
        ({"image": "a.png", "targets": [1], "prompt": "a photo"}, "must contain '{class}'"),
    ]
    for raw, message in bad:
        with pytest.raises(ParamsError, match=message):
            validate_params("counterfactual", raw)
