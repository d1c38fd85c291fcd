"""Audit params (torch-free): validation, the expansion into class steps, the follow-ups, the
ranked report and its HTML, on hand-written step records."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import pytest
from PIL import Image
from pydantic import ValidationError

from digin.core.audit_params import (
    AuditParams,
    bind_step,
    build_report,
    class_steps,
    expanded_step,
    follow_ups,
    render_html,
    step_images,
    step_others,
)
from digin.core.limits import estimate_cost
from digin.core.params import ParamsError, validate_params


def test_the_module_imports_without_torch():
    code = "import sys, digin.core.audit_params; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("raw", "message"), [
    ({"classes": []}, r"classes.*at least 1 item"),
    ({"classes": ["seven", "seven"]}, r"classes: each class at most once, repeated: \['seven'\]"),
    ({"classes": "some"}, r"classes.*Input should be 'all'"),
    ({"images": {"folder": "/data/x"}}, r"folder must contain '\{class\}'"),
    ({"images": {"digits": "train", "folder": "/d/{class}"}}, r"exactly one source"),
    ({"images": {"digits": "valid"}}, r"images.digits"),
    ({"images": {"digits": "train", "per_class": 1}}, r"per_class\n.*greater than or equal to 2"),
    ({"images": {"digits": "train", "per_class": 10_001}}, r"per_class\n.*less than or equal"),
    ({"classes": [1, 2], "images": {"image_ids": {"1": ["a"], "3": ["b"]}}},
     r"image_ids: no ids for the classes \['2'\]"),
    ({"images": {"image_ids": {"1": ["a"], "3": ["b"]}}}, r"classes: list the classes to audit"),
    ({"budget": {"components": 17}}, r"budget.components\n.*less than or equal to 16"),
    ({"budget": {"top_other": 0}}, r"budget.top_other\n.*greater than or equal to 1"),
    ({"thresholds": {"auc": 1.5}}, r"thresholds.auc\n.*less than or equal to 1"),
    ({"thresholds": {"min_variance_share": 1.0}}, r"min_variance_share\n.*less than 1"),
    ({"guidance": {"lr": 99}}, r"guidance.lr\n.*less than or equal to 10"),
    ({"guidance": {"nonsense": 1}}, r"guidance.nonsense"),
    ({"reference": "digits:cnn"}, r"reference: must differ from classifier"),
    ({"colour": "red"}, r"colour\n.*Extra inputs"),
])  # fmt: skip
def test_bad_audits_name_the_field_and_the_limit(raw, message):
    with pytest.raises(ValidationError, match="(?s)" + message):
        AuditParams.model_validate({"classifier": "digits:cnn", **raw})


def test_all_classes_expand_into_one_step_per_class_of_the_classifier():
    audit = AuditParams.model_validate(
        {"classifier": "digits:cnn-spurious", "budget": {"components": 4, "top_other": 30}}
    )
    steps = class_steps(audit)
    assert [s["class"] for s in steps] == list(range(10))
    first = validate_params("audit_class", steps[0])  # a valid job of the kind
    assert first.others == "all" and first.components == 4 and first.top_other == 30
    assert steps[0]["images"] == {"audit": True}  # the audit's images, stored once with it
    assert step_images(bind_step(first, audit)).model_dump(exclude_none=True) == {
        "digits": "train", "patch": "training", "per_class": 100}  # fmt: skip
    assert class_steps(audit, ["a", "b", "c"]) == steps[:3]  # the class list of the classifier
    full = expanded_step(steps[0], audit)
    assert full["images"]["digits"] == "train" and full["others"] == "all"
    cost = estimate_cost("audit_class", full)
    assert cost.value == 100 * 10 * 16 * 16  # 100 images of each of the 10 classes at 16²


def test_a_step_refers_to_its_audit_instead_of_copying_its_image_map():
    ids = {str(k): [f"id-{k}-a", f"id-{k}-b"] for k in range(300)}
    audit = AuditParams.model_validate({"classes": list(range(300)), "images": {"image_ids": ids}})
    steps = class_steps(audit)
    assert len(steps) == 300 and {json.dumps(s).count("id-") for s in steps} == {0}
    step = validate_params("audit_class", steps[42])
    assert (step.others, step.images.audit) == ("audit", True)
    bound = bind_step(step, audit)
    assert step_others(bound) == [str(k) for k in range(300) if k != 42]
    assert step_images(bound).image_ids == ids
    assert bound.model_dump(mode="json", by_alias=True) == steps[42]  # stored as given
    with pytest.raises(ValueError, match=r"others: refers to the audit this job is a step of"):
        step_others(step)  # not bound: run on its own, it must give its classes and images
    explicit = validate_params("audit_class", expanded_step(steps[42], audit))
    assert bind_step(explicit, None) is explicit and step_others(explicit) == step_others(bound)


def test_listed_classes_rank_each_others_images():
    audit = AuditParams.model_validate(
        {"classifier": "digits:cnn", "classes": ["three", 7], "images": {"folder": "/d/{class}"}}
    )
    steps = [expanded_step(s, audit) for s in class_steps(audit)]
    assert [(s["class"], s["others"]) for s in steps] == [("three", [7]), (7, ["three"])]
    assert steps[0]["images"]["folder"] == "/d/{class}"
    single = class_steps(audit.model_copy(update={"classes": [7]}))
    assert single[0]["others"] == "all"
    ids = {"three": ["a", "b"], "7": ["c", "d"], "nine": ["e", "f"]}
    uploads = AuditParams.model_validate({"classes": ["three"], "images": {"image_ids": ids}})
    step = class_steps(uploads)[0]
    assert expanded_step(step, uploads)["others"] == ["7", "nine"]  # the classes with ids


def test_all_classes_of_a_classifier_the_registry_does_not_know_need_its_names():
    audit = AuditParams.model_validate({"classifier": "timm:some_model@/x.safetensors"})
    with pytest.raises(ValueError, match="classes: 'all' needs the class count"):
        class_steps(audit)
    assert len(class_steps(audit, ["cat", "dog"])) == 2


def test_the_class_step_rejects_bad_params_naming_the_field():
    with pytest.raises(ParamsError, match=r"others.*at least 1 item"):
        validate_params("audit_class", {"class": 7, "others": []})
    with pytest.raises(ParamsError, match=r"thresholds.auc"):
        validate_params("audit_class", {"class": 7, "thresholds": {"auc": 0}})


def _component(l: int, auc: float, share: float, flagged: bool) -> dict:
    return {
        "component": l, "variance_share": share, "auc": auc, "mean_p_class": 0.99,
        "mean_p_top_other": 0.5, "examined": True, "flagged": flagged,
        "artifact": f"component_{l}_top_other.png",
        "top_other": [{"name": "digits:train/3", "class_index": 3, "class_name": "<three>",
                       "p": 0.9, "alpha": 2.0}],
    }  # fmt: skip


def _class_record(k: int, name: str, comps: list[dict]) -> dict:
    result = {
        "class_index": k, "class_name": name, "num_images": 100, "num_other_images": 900,
        "pca": {"mean": [0.0, 1.0], "components": [[1.0, 0.0], [0.0, 1.0]], "class_index": k},
        "components": comps, "flagged": [c["component"] for c in comps if c["flagged"]],
    }  # fmt: skip
    keys = {c["artifact"]: f"class{k}/{c['artifact']}" for c in comps}
    return {"kind": "audit_class", "params": {"class": k}, "result": result, "artifacts": keys}


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_follow_ups_and_the_ranked_report():
    audit = AuditParams.model_validate(
        {"classifier": "digits:cnn-spurious", "reference": "digits:cnn",
         "budget": {"images_per_component": 3}, "guidance": {"iterations": 2}}
    )  # fmt: skip
    two = [_component(0, 0.95, 0.8, False), _component(1, 0.6, 0.1, True)]
    seven = [_component(0, 0.45, 0.86, True), _component(1, 0.5, 0.05, True)]
    records = [
        _class_record(2, "two", two),
        _class_record(7, "seven", seven),
        _class_record(5, "five", [_component(0, 0.9, 0.7, False)]),
    ]
    assert follow_ups(audit, records[2]["result"]) == []
    jobs = follow_ups(audit, records[1]["result"])
    assert [kind for kind, _ in jobs] == ["pca_component", "disagreement"]
    vis, dis = (validate_params(kind, raw) for kind, raw in jobs)
    assert vis.components == [0, 1] and vis.class_ == 7 and vis.images_per_class == 3
    assert vis.guidance.iterations == 2 and vis.guidance.lr == 0.25  # the zoo's, then given
    assert dis.classifier1 == "digits:cnn-spurious" and dis.classifier2 == "digits:cnn"
    assert dis.classes == [7]

    items = [{"index": i, "component": i % 2} for i in range(4)]
    follow = [
        {"kind": "pca_component", "params": jobs[0][1], "result": {"items": items},
         "artifacts": {f"item_{i:03d}.png": f"vis7/item_{i:03d}.png" for i in range(4)}},
        {"kind": "disagreement", "params": jobs[1][1], "result": {"items": items[:1]},
         "artifacts": {"item_000.png": "dis7/item_000.png"}},
    ]  # fmt: skip
    report = build_report(audit, records, follow)
    assert report["flagged"] == ["seven", "two"]
    assert [r["class_name"] for r in report["classes"]] == ["seven", "two", "five"]
    seven = report["classes"][0]
    assert (seven["rank"], seven["auc"], seven["component"]) == (1, 0.45, 0)
    assert seven["components"][0]["visualizations"] == ["vis7/item_000.png", "vis7/item_002.png"]
    assert seven["components"][0]["top_other_image"] == "class7/component_0_top_other.png"
    assert seven["disagreement"] == ["dis7/item_000.png"]
    assert report["classes"][2]["auc"] is None and report["classes"][2]["min_auc"] == 0.9

    images = {"class7/component_0_top_other.png": _png("red"), "vis7/item_000.png": _png("blue")}
    page = render_html(report, images)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert f"data:image/png;base64,{base64.b64encode(images['vis7/item_000.png']).decode()}" in page
    assert "&lt;three&gt;" in page and "<three>" not in page  # text is escaped
    assert "vis7/item_002.png (not included)" in page
    assert page.index("seven") < page.index("five")
