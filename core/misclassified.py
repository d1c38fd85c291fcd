"""Error visualisation: the `misclassified` kind (docs/architecture.md §4.9).

The paper's systematic-mistake mode: the images of a labelled set that the classifier gets
wrong, each edited into a counterfactual towards its TRUE class, so that what the classifier
would need to see to be right becomes visible.

1. Models, and the labelled images at the classifier's input size (`core/imagesets.py`): a
   digits split (true class: the digit), one folder per class ('{class}' / '{index}' in the
   path; true class: the folder's), or uploaded image ids with one true class each.
2. The scan: the classifier's prediction on the clean view of every image; the misclassified
   ones, in set order, at most `max_images` of them.
3. One `counterfactual` run per misclassified image (`run_counterfactual`, the same settings
   for all): start class = the prediction (the caption names it), target = the true class;
   image j is seeded `seed + j`. A stop keeps the images edited so far.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from digin.core.classifiers import Classifier
from digin.core.context import RunContext
from digin.core.counterfactual.job import CounterfactualResult, class_probs, run_counterfactual
from digin.core.imagesets import load_image_set
from digin.core.jobs import DEFAULT_CACHE, class_index, record_header, software_versions
from digin.core.output import CAPTION_H, png_bytes, to_pil
from digin.core.params import CounterfactualParams, MisclassifiedParams

KIND = "misclassified"
SCAN_BATCH = 256  # images per classifier call of the scan


@dataclass
class LabelledImages:
    images: Tensor  # (N, 3, r, r) in [0, 1], the classifier's input size r
    labels: Tensor  # (N,) true class indices
    # per image: {'image': a path or 'digits:<split>/<n>'} or {'image_id': an uploaded id}
    refs: list[dict[str, str]]


@dataclass
class Mistake:
    """One misclassified image and its counterfactual towards the true class."""

    index: int  # position among the job's edited images
    position: int  # position in the scanned set
    ref: dict[str, str]
    true_index: int
    true_name: str
    predicted_index: int
    predicted_name: str
    p_true: float  # p(true class | image) on the scan's clean view
    p_predicted: float
    counterfactual: CounterfactualResult | None = None  # None: not reached (stopped)


@dataclass
class MisclassifiedResult:
    kind: str
    params: dict
    seed: int
    models: dict[str, str]
    device: str
    scanned: int
    errors: int  # misclassified images in the set (all of them, not only the edited)
    mistakes: list[Mistake]
    stopped: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """The JSON record of the job (result.json)."""
        images = [_describe(m) for m in self.mistakes]
        judged = [im["counterfactual"]["flip"] for im in images if im["counterfactual"]]
        return {
            **record_header(self),
            "scanned": self.scanned,
            "errors": self.errors,
            "accuracy": 1 - self.errors / self.scanned if self.scanned else None,
            "edited": len(judged),
            "flip_rate": sum(judged) / len(judged) if judged else None,
            "stopped": self.stopped,
            "images": images,
            "metric_names": {
                "p_true": "p(true class | image) of the classifier, on the scan's clean view",
                "flip": "argmax of the classifier on the counterfactual == the true class",
                "counterfactual": "the counterfactual kind's record of the edit's one target",
            },
            "timings": self.timings,
            "versions": software_versions(),
        }

    def render_artifacts(self) -> dict[str, bytes]:
        """name → bytes: per edited image its counterfactual's files prefixed `image_XXX_`
        (original, reconstruction, mask, item_000 = the counterfactual, grid), grid.png
        (original | counterfactual per image, captioned) and result.json."""
        out: dict[str, bytes] = {}
        for m in self.mistakes:
            if m.counterfactual is None:
                continue
            files = m.counterfactual.render_artifacts()
            files.pop("result.json")
            out |= {f"image_{m.index:03d}_{name}": data for name, data in files.items()}
        out["grid.png"] = png_bytes(mistakes_grid(self))
        summary = self.summary()
        summary["artifacts"] = sorted([*out, "result.json"])
        out["result.json"] = json.dumps(summary, indent=2).encode()
        return out


def _describe(m: Mistake) -> dict[str, Any]:
    cf = None
    if m.counterfactual is not None and m.counterfactual.guidance is not None:
        (item,) = m.counterfactual.summary()["items"]
        keys = ("prompt", "best_iteration", "before", "reconstruction", "edit", "after", "flip",
                "l1_distance", "l2_distance")  # fmt: skip
        cf = {k: item[k] for k in keys}
        cf["caption"] = m.counterfactual.caption
    return {
        "index": m.index,
        "position": m.position,
        "image": m.ref,
        "true_class": {"index": m.true_index, "name": m.true_name},
        "predicted_class": {"index": m.predicted_index, "name": m.predicted_name},
        "p_true": m.p_true,
        "p_predicted": m.p_predicted,
        "counterfactual": cf,
    }


def mistakes_grid(result: MisclassifiedResult, tile: int = 128) -> Image.Image:
    """One row per edited image: the original and its counterfactual, captioned."""
    rows = [m for m in result.mistakes if m.counterfactual is not None]
    rows = [m for m in rows if m.counterfactual.guidance is not None]  # type: ignore[union-attr]
    grid = Image.new("RGB", (2 * tile, max(1, len(rows)) * (tile + CAPTION_H)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=11)
    for r, m in enumerate(rows):
        cf = m.counterfactual
        assert cf is not None and cf.guidance is not None  # filtered above
        y = r * (tile + CAPTION_H)
        after = float(cf.guidance.metrics["p"][cf.guidance.best_iteration[0], 0])
        for c, image in enumerate((cf.original[0], cf.guidance.images[0])):
            small = image.shape[-1] < tile
            resample = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
            grid.paste(to_pil(image).resize((tile, tile), resample), (c * tile, y))
        text = f"true {m.true_name[:14]} p {m.p_true:.2f}"
        draw.text((2, y + tile + 2), text, fill="black", font=font)
        draw.text((2, y + tile + 15), f"pred {m.predicted_name[:14]}", fill="gray", font=font)
        draw.text((tile + 2, y + tile + 2), f"-> p(true) {after:.2f}", fill="black", font=font)
    return grid


def load_labelled(
    params: MisclassifiedParams, classifier: Classifier, ctx: RunContext
) -> LabelledImages:
    """The job's labelled images at the classifier's input size, their true classes, and how a
    counterfactual names each (see the module docstring)."""
    spec, size = params.images, classifier.input_size
    if spec.digits is not None:
        loaded = load_image_set(spec, size=size, class_index=0, class_name="", field="images")
        assert loaded.labels is not None  # the digits source has labels
        refs = [{"image": ref} for ref in _digit_refs(spec.digits, loaded.names)]
        return LabelledImages(loaded.images, loaded.labels.long(), refs)
    if spec.image_ids is not None:
        assert params.labels is not None  # validated with the params
        loaded = load_image_set(spec, size=size, class_index=0, class_name="", field="images",
                                resolver=ctx.image_resolver)  # fmt: skip
        labels = [_class(ref, classifier, f"labels.{i}") for i, ref in enumerate(params.labels)]
        refs = [{"image_id": i} for i in loaded.names]
        return LabelledImages(loaded.images, torch.tensor(labels[: len(refs)]), refs)
    assert spec.folder is not None and params.classes is not None  # validated with the params
    parts, labels, refs = [], [], []
    for i, ref in enumerate(params.classes):
        k = _class(ref, classifier, f"classes.{i}")
        name = classifier.class_names[k]
        loaded = load_image_set(spec, size=size, class_index=k, class_name=name, field="images")
        folder = Path(spec.folder.replace("{class}", name).replace("{index}", str(k)))
        parts.append(loaded.images)
        labels += [k] * len(loaded)
        refs += [{"image": str(folder / n)} for n in loaded.names]
    return LabelledImages(torch.cat(parts), torch.tensor(labels), refs)


def _class(ref: int | str, classifier: Classifier, field_name: str) -> int:
    try:
        return class_index(ref, classifier)
    except ValueError as exc:
        raise ValueError(f"{field_name}: {exc}") from None


def _digit_refs(split: str, names: list[str]) -> list[str]:
    """The image set's digits ('digits:<split>/<index in the whole data>') as start images
    ('digits:<split>/<position in the split>')."""
    from digin.core.digits.data import load_images, make_splits

    indices = getattr(make_splits(load_images()[1]), split)
    position = {int(i): n for n, i in enumerate(indices)}
    return [f"digits:{split}/{position[int(name.rsplit('/', 1)[1])]}" for name in names]


def run_misclassified(params: MisclassifiedParams, ctx: RunContext) -> MisclassifiedResult:
    """Counterfactuals of the misclassified images towards their true classes; see the module
    docstring."""
    t_start = time.perf_counter()
    cache = ctx.cache or DEFAULT_CACHE

    # 1. the classifier and the labelled images
    classifier = cache.classifier(params.classifier, ctx.device, params.clip_templates)
    data = load_labelled(params, classifier, ctx)

    # 2. the scan: predictions on the clean view, the misclassified images in set order
    probs = torch.cat([class_probs(classifier, chunk) for chunk in data.images.split(SCAN_BATCH)])
    predicted = probs.argmax(1)
    wrong = (predicted != data.labels).nonzero()[:, 0].tolist()
    names = classifier.class_names
    mistakes = [
        Mistake(j, pos, data.refs[pos], int(data.labels[pos]), names[int(data.labels[pos])],
                int(predicted[pos]), names[int(predicted[pos])],
                float(probs[pos, data.labels[pos]]), float(probs[pos, predicted[pos]]))
        for j, pos in enumerate(wrong[: params.max_images])
    ]  # fmt: skip
    result = MisclassifiedResult(
        kind=KIND,
        params=params.model_dump(mode="json"),
        seed=ctx.seed,
        models={"diffusion": params.diffusion, "classifier": params.classifier},
        device=ctx.device,
        scanned=len(data.refs),
        errors=len(wrong),
        mistakes=mistakes,
    )
    t_scanned = time.perf_counter()

    # 3. one counterfactual per mistake, towards the true class
    _edit_mistakes(params, ctx, result)
    result.timings = {
        "scan_s": t_scanned - t_start,
        "edits_s": time.perf_counter() - t_scanned,
        "total_s": time.perf_counter() - t_start,
    }
    return result


def _edit_mistakes(
    params: MisclassifiedParams, ctx: RunContext, result: MisclassifiedResult
) -> None:
    """Run the counterfactual of every mistake in turn; progress counts over all of them."""
    steps = params.guidance.iterations + 1  # one target: one batch per image
    total = steps * len(result.mistakes)
    shared = params.edit_params()
    for m in result.mistakes:

        def progress(step: int, _total: int, info: dict, _done: int = m.index * steps,
                     _image: int = m.index) -> None:  # fmt: skip
            if ctx.progress is not None:
                ctx.progress(_done + step, total, {**info, "image": _image})

        start = m.true_index if params.caption_class == "true" else m.predicted_index
        cf_params = CounterfactualParams.model_validate(
            {**shared, **m.ref, "targets": [m.true_index], "start_class": start}
        )
        sub = replace(ctx, seed=ctx.seed + m.index, progress=progress)
        m.counterfactual = run_counterfactual(cf_params, sub)
        if m.counterfactual.stopped:
            result.stopped = True
            break
