"""The API checks a counterfactual's `captioner` and `segmenter` like its other models: the
spec's kind, the allow-list and the model roots (digin.api.schemas.check_model_spec)."""

from __future__ import annotations

from digin.api.schemas import check_model_spec, model_specs


def test_captioner_and_segmenter_fields_take_models_of_their_kind():
    params = {"diffusion": "digits", "captioner": "blip:Salesforce/blip-image-captioning-base",
              "segmenter": "sam:./sam", "caption": None}  # fmt: skip
    assert model_specs(params) == [
        ("params.diffusion", "digits", "diffusion"),
        ("params.captioner", "blip:Salesforce/blip-image-captioning-base", "captioner"),
        ("params.segmenter", "sam:./sam", "segmenter"),
    ]
    wrong = check_model_spec("sam:facebook/sam-vit-base", "captioner", None)
    assert (
        wrong
        == "'sam:facebook/sam-vit-base' is a segmenter model; this field takes a captioner model"
    )
    assert check_model_spec("blip:Salesforce/blip-image-captioning-base", "captioner", None) is None
    refused = check_model_spec(
        "blip:Salesforce/blip-image-captioning-large", "captioner", ["timm:*"]
    )
    assert refused is not None and "allow-list" in refused
    assert check_model_spec("sam:/srv/sam", "segmenter", None, model_roots=["/models"]) is not None
