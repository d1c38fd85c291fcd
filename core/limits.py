"""What an accepted job may ask of a worker (docs/architecture.md §9.7): its cost estimate,
and a bounded cache for what grows with what clients send.

Torch-free (stdlib, pydantic through `digin.core.params`): the API estimates every job before
it is accepted, with the numbers its normalised params give (no model is loaded, nothing is
read from disk).

The cost of a job is the work of its model passes over pixels:

    generative kinds   items x passes x DDIM steps x pixels      (passes = iterations + 1,
                       + 1 with a neuron foreground blend: the chain that makes the mask)
    counterfactual     as above over its targets, a pass per (prompt-to-prompt, blend) pair
                       of the schedule search counted too, plus the inversion of the one
                       image, plus the captioner's passes (tokens x beams) and the
                       segmenter's one pass at their input sides
    analysis kinds     images x pixels (each image through the classifier once), plus the
                       neural_pca visualisation as a generative job; audit_class: images per
                       class x (1 + other classes)

Pixels are the image side squared: the params' `resolution`, else the diffusion model's native
side (`digin.core.registry.native_resolution`), else ASSUMED_DIFFUSION_SIDE; for classifiers
their input side, else ASSUMED_CLASSIFIER_SIDE. Image sets count their ids, their `limit`, or
the most they can hold. The same numbers (items, iterations, steps, side) are what memory and
time grow with, so one cap (DIGIN_MAX_JOB_COST) bounds both, for every kind.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from digin.core.params import DEFAULT_CLASSIFIER, MAX_SET_IMAGES, PARAMS_BY_KIND
from digin.core.registry import classifier_facts, input_side, native_resolution
from digin.core.wordnet import wordnet_target_count

# A diffusion model whose native side is unknown without loading it is assumed to be this large:
# the largest native side of the supported families (SDXL), so the estimate never undercounts.
ASSUMED_DIFFUSION_SIDE = 1024
ASSUMED_CLASSIFIER_SIDE = 384  # the largest input side of the curated classifiers
ASSUMED_CAPTIONER_SIDE = 384  # BLIP's
ASSUMED_SEGMENTER_SIDE = 1024  # SAM's
ASSUMED_CLASSES = 1000  # a classifier of unknown class count: ImageNet's (CLIP's default names)
DIGITS_IMAGES = 1797  # scikit-learn's digits, of which each split is a part


@dataclass(frozen=True)
class JobCost:
    """A job's estimated cost (`value`, in pixel-steps) and the terms it is the sum of."""

    value: int
    terms: tuple[str, ...]

    def describe(self) -> str:
        return " + ".join(self.terms)

    def __add__(self, other: JobCost) -> JobCost:
        return JobCost(self.value + other.value, self.terms + other.terms)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _chain(what: str, items: int, passes: int, steps: int, side: int) -> JobCost:
    value = items * passes * steps * side * side
    text = " x ".join(
        [
            _count(items, what),
            f"{passes} pass" + ("" if passes == 1 else "es"),
            _count(steps, "DDIM step"),
            f"{side}² pixels",
        ]
    )
    return JobCost(value, (text,))


def _images(what: str, count: int, side: int) -> JobCost:
    return JobCost(count * side * side, (f"{_count(count, what)} x {side}² pixels",))


def _diffusion_side(params: Mapping[str, Any]) -> int:
    resolution = params.get("resolution")
    if isinstance(resolution, int):
        return resolution
    return native_resolution(str(params.get("diffusion"))) or ASSUMED_DIFFUSION_SIDE


def _classifier_side(spec: Any) -> int:
    return classifier_facts(str(spec))[0] or ASSUMED_CLASSIFIER_SIDE


def _set_size(spec: Any) -> int:
    """The most images an image set (an ImageSetSpec as JSON) can hold."""
    if isinstance(spec, str):  # short forms: 'digits:<split>' or a folder
        spec = {"digits": spec} if spec.startswith("digits:") else {"folder": spec}
    if not isinstance(spec, Mapping):
        return MAX_SET_IMAGES
    if spec.get("image_ids"):
        size = len(spec["image_ids"])
    elif spec.get("digits"):
        size = DIGITS_IMAGES
    else:
        size = MAX_SET_IMAGES
    limit = spec.get("limit")
    return min(size, limit) if isinstance(limit, int) else size


def _guidance(params: Mapping[str, Any]) -> tuple[int, int]:
    """(passes, DDIM steps): every iteration runs the chain, and the last one evaluates."""
    guidance = params.get("guidance") or {}
    return int(guidance.get("iterations", 0)) + 1, int(guidance.get("ddim_steps", 1))


def _generative(params: Mapping[str, Any]) -> JobCost:
    refs = params.get("neurons") or params.get("classes") or [None]
    items = len(refs) * int(params.get("images_per_class") or 1)
    passes, steps = _guidance(params)
    if float(params.get("foreground_blend") or 0) > 0:  # neuron: the chain that makes the mask
        passes += 1
    return _chain("item", items, passes, steps, _diffusion_side(params))


def _pca_component(params: Mapping[str, Any]) -> JobCost:
    items = len(params.get("components") or [0]) * int(params.get("images_per_class") or 1)
    return _chain("item", items, *_guidance(params), _diffusion_side(params))


def _neural_pca(params: Mapping[str, Any]) -> JobCost:
    spec = params.get("classifier") or DEFAULT_CLASSIFIER
    cost = _images("image", _set_size(params.get("images")), _classifier_side(spec))
    vis = params.get("visualization") or {}
    components = int(vis.get("components", 0))
    if components > 0:
        items = components * int(vis.get("images_per_class") or 1)
        cost += _chain("visualised item", items, *_guidance(vis), _diffusion_side(vis))
    return cost


def _spurious_score(params: Mapping[str, Any]) -> JobCost:
    classes = len(params.get("classes") or [None])
    per_class = _set_size(params.get("class_images")) + _set_size(params.get("spurious"))
    spec = params.get("classifier") or DEFAULT_CLASSIFIER
    return _images("image", classes * per_class, _classifier_side(spec))


def _counterfactual(params: Mapping[str, Any]) -> JobCost:
    targets = params.get("targets")
    if isinstance(targets, list):
        n = len(targets)
    elif isinstance(targets, str) and targets.startswith("wordnet"):
        n = wordnet_target_count(targets, params.get("start_class"))
    else:  # 'others': every class but the start class
        n = max(1, (classifier_facts(str(params.get("classifier")))[1] or ASSUMED_CLASSES) - 1)
    passes, steps = _guidance(params)
    cf = params.get("counterfactual") or {}
    # each (p2p fraction, blend fraction) pair of the schedule search: one chain of every target
    blends = {cf.get("blend_fraction", 0.3), *(cf.get("blend_search") or ())}
    search = len(cf.get("p2p_fractions") or [0.0]) * len(blends)
    side = _diffusion_side(params)
    # the inversion of the one image: DDIM inversion, per step the conditional pass, the
    # null-text steps and the step taken, then three reconstructions
    inversion = int(cf.get("null_text_steps", 0)) + 5
    return (
        _chain("target", n, passes + search, steps, side)
        + _chain("inverted image", 1, inversion, steps, side)
        + _counterfactual_extras(params, cf)
    )


def _counterfactual_extras(params: Mapping[str, Any], cf: Mapping[str, Any]) -> JobCost:
    """The captioner (when no caption is given; a pass per token and beam) and the segmenter."""
    cost = JobCost(0, ())
    if params.get("captioner") and not params.get("caption"):
        side = input_side(str(params["captioner"])) or ASSUMED_CAPTIONER_SIDE
        passes = int(cf.get("caption_max_tokens", 20)) * int(cf.get("caption_beams", 3))
        cost += _images("captioner step", passes, side)
    if params.get("segmenter"):
        side = input_side(str(params["segmenter"])) or ASSUMED_SEGMENTER_SIDE
        cost += _images("segmented image", 1, side)
    return cost


def _misclassified(params: Mapping[str, Any]) -> JobCost:
    """The scan (every image through the classifier; one folder per class) plus, per edited
    image, a counterfactual with one target."""
    images = params.get("images")
    folders = len(params.get("classes") or [None])
    spec = params.get("classifier") or DEFAULT_CLASSIFIER
    scan = _images("scanned image", folders * _set_size(images), _classifier_side(spec))
    edit = _counterfactual({**params, "targets": [None]})
    n = int(params.get("max_images") or 1)
    return scan + JobCost(n * edit.value, tuple(f"{n} x ({t})" for t in edit.terms))


def _audit_class(params: Mapping[str, Any]) -> JobCost:
    """Class k's images and those of every other class, each through the classifier once."""
    spec = params.get("classifier") or DEFAULT_CLASSIFIER
    others = params.get("others")
    if not isinstance(others, list):  # 'all': every other class
        others = [None] * ((classifier_facts(str(spec))[1] or ASSUMED_CLASSES) - 1)
    images = params.get("images") or {}
    per_class = int(images.get("per_class") or MAX_SET_IMAGES)
    if images.get("image_ids"):
        per_class = min(per_class, max(len(ids) for ids in images["image_ids"].values()))
    return _images("image", per_class * (1 + len(others)), _classifier_side(spec))


CostFn = Callable[[Mapping[str, Any]], JobCost]
COST_BY_KIND: dict[str, CostFn] = dict.fromkeys(("guided", "disagreement", "neuron"), _generative)
COST_BY_KIND |= {"pca_component": _pca_component, "neural_pca": _neural_pca,
                 "spurious_score": _spurious_score, "counterfactual": _counterfactual,
                 "misclassified": _misclassified, "audit_class": _audit_class}  # fmt: skip
if set(COST_BY_KIND) != set(PARAMS_BY_KIND):
    raise RuntimeError(f"kinds without a cost estimate: {set(COST_BY_KIND) ^ set(PARAMS_BY_KIND)}")


def estimate_cost(kind: str, params: Mapping[str, Any] | BaseModel) -> JobCost:
    """The cost of a job of `kind` from its validated params (the model, or the normalised JSON
    the service stores): see the module docstring. Arithmetic only."""
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    return COST_BY_KIND[kind](params)


def stored_cost(kind: str, params: Mapping[str, Any]) -> int | None:
    """The estimate of a stored job's normalised params, for showing (None for params this
    version cannot read: a kind or shape of an older release)."""
    try:
        return estimate_cost(kind, params).value
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def cost_error(
    kind: str, params: Mapping[str, Any] | BaseModel, limit: int | None
) -> dict[str, str] | None:
    """A {field, message} error when the job's estimated cost is above `limit` (None: no cap),
    naming both; else None."""
    if limit is None:
        return None
    cost = estimate_cost(kind, params)
    if cost.value <= limit:
        return None
    message = (
        f"the job's estimated cost {cost.value:.3g} pixel-steps ({cost.describe()}) is above "
        f"this service's limit of {limit:.3g} (DIGIN_MAX_JOB_COST); ask for fewer items, "
        "iterations, DDIM steps or pixels, or split the job into a batch"
    )
    return {"field": "params", "message": message}


# --- bounded caches ------------------------------------------------------------------------------
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A mapping of at most `size` entries that forgets the least recently used one: for caches
    keyed by what clients send (model specs, class-name lists, group keys), which must not grow
    a long-lived process without bound."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an LRU cache holds at least 1 entry, got {size}")
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, default: V | None = None) -> V | None:
        if key not in self._data:
            return default
        self._data.move_to_end(key)
        return self._data[key]

    def __setitem__(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        """The keys, the least recently used first."""
        return iter(list(self._data))

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The entry of `key`, made (and kept) on a miss."""
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        value = make()
        self[key] = value
        return value
