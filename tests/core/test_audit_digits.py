"""Known answers of classifier audits on the digits zoo.

`digits:cnn-spurious` was trained with a planted patch tied to one class (its model card's
`training.patch_plan` and `patch`); `digits:cnn` was not. An audit of all ten classes (the train
digits with the patch at each classifier's training rates) must flag exactly the card's class,
and the `pca_component` visualisation of its flagged component must draw the card's patch (the
detector `patch_present`); an audit of `digits:cnn` flags nothing. The class and the patch are
read from the cards, never assumed. A copy of the zoo folder whose card names another class and
another patch shows that the image sets follow the card.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digin.core.audit import audit_image_spec, load_class_images, run_audit
from digin.core.audit_params import AuditParams
from digin.core.context import RunContext
from digin.core.digits.data import CLASS_NAMES, PatchSpec, patch_present
from digin.core.digits.zoo import card_patch, classifier_patch, read_card, resolve_zoo_dir
from digin.core.imagesets import load_image_set
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job
from digin.core.params import AuditImages, ImageSetSpec
from tests.core.precision import DEVICE, with_precision


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 16x16 models gain nothing from intra-op threads on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture(scope="module")
def card():
    return read_card("cnn-spurious")


@pytest.fixture(scope="module")
def spurious_audit(cache):
    audit = AuditParams.model_validate(
        with_precision({"classifier": "digits:cnn-spurious", "budget": {"images_per_component": 4}})
    )
    return run_audit(audit, RunContext(device=DEVICE, cache=cache, max_batch=32))


def _decoded(files: dict[str, bytes], keys: list[str]) -> torch.Tensor:
    """PNG files → (N, 3, H, W) in [0, 1]."""
    arrays = [np.asarray(Image.open(io.BytesIO(files[k])).convert("RGB")) for k in keys]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_an_audit_of_cnn_spurious_flags_the_cards_class_and_draws_its_patch(spurious_audit, card):
    correlated = CLASS_NAMES[card["training"]["patch_plan"]["correlated_class"]]
    report = spurious_audit.report
    assert report["flagged"] == [correlated]  # that class first, and no other
    top = report["classes"][0]
    assert top["class_name"] == correlated and top["rank"] == 1
    assert top["auc"] < 0.75 and top["variance_share"] >= 0.02
    assert all(not r["flagged"] and r["min_auc"] >= 0.75 for r in report["classes"][1:])
    flagged = next(c for c in top["components"] if c["component"] == top["component"])
    # the other-class images it ranks highest carry the patch, and the classifier says k
    assert sum(o["patched"] for o in flagged["top_other"]) >= 0.8 * len(flagged["top_other"])
    # its visualisations draw the card's patch
    keys = flagged["visualizations"]
    assert len(keys) == 4
    drawn = patch_present(_decoded(spurious_audit.files, keys), card_patch(card))
    assert float(drawn.float().mean()) >= 0.8
    # the files: every step's, the report as JSON and as one self-contained HTML page
    files = spurious_audit.render_artifacts()
    assert json.loads(files["report.json"])["flagged"] == [correlated]
    assert flagged["top_other_image"] in files and "data:image/png;base64," in spurious_audit.html


def test_an_audit_of_cnn_flags_nothing(cache):
    audit = AuditParams.model_validate({"classifier": "digits:cnn"})
    run = run_audit(audit, RunContext(device=DEVICE, cache=cache))
    report = run.report
    assert report["flagged"] == [] and len(report["classes"]) == 10
    assert min(r["min_auc"] for r in report["classes"]) >= 0.9
    assert not any(key.startswith("pca_component") for key in run.files)  # no follow-ups


def test_audit_class_runs_as_a_job_and_writes_its_figures(cache, card):
    k = card["training"]["patch_plan"]["correlated_class"]
    params = {"classifier": "digits:cnn-spurious", "class": CLASS_NAMES[k], "components": 2,
              "top_other": 10, "shown": 4,
              "images": {"digits": "test", "per_class": 20}}  # fmt: skip
    result = run_job("audit_class", params, cache=cache)
    files = result.render_artifacts()
    summary = json.loads(files["result.json"])
    assert summary["kind"] == "audit_class" and summary["class_index"] == k
    assert summary["num_images"] == 20 and summary["num_other_images"] == 9 * 20
    assert len(summary["pca"]["components"]) == 2 and summary["flagged"]
    for c in summary["components"]:
        assert c["artifact"] in files and len(c["top_other"]) == 4
        assert Image.open(io.BytesIO(files[c["artifact"]])).size[1] > 0


def test_digin_run_audit_class_runs_the_example(tmp_path, card):
    from typer.testing import CliRunner

    from digin.cli import app

    example = Path(__file__).resolve().parents[2] / "examples" / "audit_class_digits.json"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "audit_class", "--params", str(example),
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "result.json").read_text())
    k = card["training"]["patch_plan"]["correlated_class"]
    assert summary["class_index"] == k and summary["flagged"]  # the shipped zoo's class
    assert all((out / c["artifact"]).is_file() for c in summary["components"])


def test_image_sets_follow_the_model_card_of_the_classifiers_zoo_folder(tmp_path, cache):
    """A zoo folder whose card names another class (three) and another patch (4x4 at the
    bottom right, intensity 0.8): the audit plants that patch at that class's rate."""
    zoo = tmp_path / "zoo"
    shutil.copytree(resolve_zoo_dir(), zoo)
    path = zoo / "cnn-spurious.json"
    edited = json.loads(path.read_text())
    plan = {"correlated_class": 3, "rate_correlated_class": 0.5, "rate_other_classes": 0.0}
    edited["training"]["patch_plan"] |= plan
    spec = {"top": 12, "left": 12, "size": 4, "intensity": 0.8, "threshold": 0.3}
    edited["patch"]["spec"] = spec
    path.write_text(json.dumps(edited))
    clf = cache.classifier(f"digits:cnn-spurious@{zoo}", "cpu", "openai")
    ctx = RunContext(cache=cache)
    images = AuditImages(digits="train", per_class=40)
    threes = load_class_images(images, clf, 3, ctx)
    planted = PatchSpec(**spec)
    assert int(threes.patched.sum()) == 20  # round(0.5 · 40)
    assert torch.equal(patch_present(threes.images, planted), threes.patched)
    assert not bool(patch_present(threes.images, PatchSpec()).any())  # not the default square
    sevens = load_class_images(images, clf, 7, ctx)
    assert not bool(sevens.patched.any())  # rate 0 for the other classes
    assert audit_image_spec(images, clf, 7, "images").patch is None
    # an image set of the other kinds (neural_pca, spurious_score) whose patch plan gives no
    # geometry takes the card's
    plan = ImageSetSpec.model_validate({"digits": "test", "labels": "other", "patch": {}})
    others = load_image_set(plan, size=16, class_index=3, class_name="three",
                            zoo_patch=classifier_patch(clf))  # fmt: skip
    assert bool(patch_present(others.images, planted).all())
    assert not bool(patch_present(others.images, PatchSpec()).any())
    # a plan that fits the default square but not the card's patch is refused, naming the field
    near_edge = ImageSetSpec.model_validate({"digits": "test", "patch": {"top": 13}})
    with pytest.raises(ValueError, match=r"spurious\.patch: .*4px at top=13.*must lie inside"):
        load_image_set(near_edge, size=16, class_index=3, class_name="three", field="spurious",
                       zoo_patch=classifier_patch(clf))  # fmt: skip


def test_audit_class_reads_folders_and_uploaded_ids_per_class(tmp_path, cache):
    """The same digits as files in one folder per class, and as uploaded ids per class."""
    from digin.core.digits.data import load_images, make_splits

    x, y = load_images()
    test = torch.as_tensor(make_splits(y).test)
    uploads: dict[str, bytes] = {}
    ids: dict[str, list[str]] = {}
    for k in (1, 3, 7):
        folder = tmp_path / CLASS_NAMES[k]
        folder.mkdir()
        for n, i in enumerate(test[y[test] == k][:10].tolist()):
            buf = io.BytesIO()
            Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)).save(buf, format="PNG")
            (folder / f"{n:02d}.png").write_bytes(buf.getvalue())
            uploads[f"id-{k}-{n}"] = buf.getvalue()
            ids.setdefault(CLASS_NAMES[k], []).append(f"id-{k}-{n}")
    common = {"classifier": "digits:cnn", "class": "seven", "others": ["one", "three"],
              "components": 2, "top_other": 5, "shown": 3}  # fmt: skip
    sources = [({"folder": f"{tmp_path}/{{class}}", "per_class": 8}, None),
               ({"image_ids": ids, "per_class": 8}, uploads.__getitem__)]  # fmt: skip
    for images, resolver in sources:
        result = run_job("audit_class", {**common, "images": images}, cache=cache,
                         image_resolver=resolver)  # fmt: skip
        data = result.data
        assert (data["num_images"], data["num_other_images"]) == (8, 16)
        assert data["flagged"] == []  # digits:cnn does not take ones or threes for sevens
        top = data["components"][0]["top_other"]
        assert {o["class_name"] for o in top} <= {"one", "three"} and len(top) == 3
    with pytest.raises(ValueError, match=r"images \(class 3\)\.image_ids: no ids for class"):
        missing = {"seven": ids["seven"], "one": ids["one"]}
        run_job("audit_class", {**common, "images": {"image_ids": missing}}, cache=cache,
                image_resolver=uploads.__getitem__)  # fmt: skip
