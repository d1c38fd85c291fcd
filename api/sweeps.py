"""Planning a batch (docs/architecture.md §9.9): expand the axes or the explicit items into one
job per item and validate every item before anything is written. Pure: no database, no broker,
no torch.

Axes: classifiers (or classifier pairs) × classes × seeds over the params template, in that
order (the items of one classifier are adjacent, so a worker finds compatible items next to each
other); `images_per_class` goes into every item's params. Each item gets a stable `custom_id`:
`c=<class>|m=<classifier>|s=<seed>` (a pair: `m=<c1>,<c2>`).

Validation is exact but cheap for large sweeps: the full pydantic validation of the params
(`JobCreate.normalised_params`: defaults, limits, model specs, allow-list) runs once per distinct
combination of everything but the classes, and each item's classes are checked on their own:
that they are class references (an index ≥ 0 or a name of 1–200 characters, 1–1000 of them)
and, where the classifier's classes are known (the registry, the digits zoo), that they name
one of them. That is sound because the classes of these kinds enter no other validation rule.
Each item's estimated cost (`digin.core.limits.estimate_cost`, with its own classes) is checked
against DIGIN_MAX_JOB_COST, as a single job's is.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from digin.api.problems import ProblemError
from digin.api.schemas import BatchCreate, ClassRange, JobCreate
from digin.core.classes import imagenet_class_names, resolve_class
from digin.core.limits import cost_error
from digin.core.params import group_key
from digin.core.registry import ModelRoots, check_model_roots, list_models, parse_spec, zoo_dir
from digin.service.repo.batches import BatchPlan, PlannedItem

MAX_ERRORS = 20  # bad items reported in one problem; planning stops there
MAX_CLASSES_PER_ITEM = 1000
MAX_CLASS_NAME = 200  # characters of a class name (the params' limit)
MAX_SPEC_CHARS = 500  # characters of a model spec (the params' and BatchCreate's limit)
# kinds whose `classes` only name classes (checked per item; the rest validated once)
CLASS_ONLY_KINDS = ("guided", "disagreement", "spurious_score")
CLASSIFIER_FIELD = {"disagreement": ("classifier1", "classifier2")}
# The caches below are keyed by what clients send (specs, class references): bounded, so that
# requests naming ever new classifiers or classes cannot grow the process. Sized to real use:
# the classifiers of a deployment's sweeps (their class names held once each), and the (class,
# classifier) pairs of a few 1000-class sweeps resubmitted together.
CLASS_NAMES_CACHE = 128
CLASS_ERRORS_CACHE = 4096
Roots = tuple[str, ...] | None  # model roots as a cache key (None: any path)


# --- the classes of a classifier ----------------------------------------------------------------
@lru_cache(maxsize=1)
def _registry_classes() -> dict[str, int]:
    return {m.spec: m.num_classes for m in list_models() if m.num_classes}


def _roots_key(model_roots: ModelRoots | None) -> Roots:
    return None if model_roots is None else tuple(str(Path(root)) for root in model_roots)


def class_names(spec: str, model_roots: ModelRoots | None = None) -> tuple[str, ...] | None:
    """The classifier's class names where known without loading it (the digits zoo's model
    cards, the registry's ImageNet classifiers), else None (also for a malformed spec, and for a
    zoo folder outside `model_roots`, which is never read: see
    `digin.core.registry.check_model_roots`)."""
    if not isinstance(spec, str) or not 0 < len(spec) <= MAX_SPEC_CHARS:
        return None
    return _class_names(spec, _roots_key(model_roots))


@lru_cache(maxsize=CLASS_NAMES_CACHE)
def _class_names(spec: str, roots: Roots) -> tuple[str, ...] | None:
    try:
        parsed = parse_spec(spec)
        if check_model_roots(parsed, roots) is not None:
            return None
    except ValueError:
        return None
    if parsed.scheme == "digits" and parsed.kind == "classifier":
        card = zoo_dir(parsed.weights) / f"{parsed.arch}.json"
        try:
            names = json.loads(card.read_text())["class_names"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return None
        return tuple(names)
    if _registry_classes().get(spec) == 1000:
        return tuple(imagenet_class_names())
    return None


def class_count(spec: str, model_roots: ModelRoots | None = None) -> int | None:
    names = class_names(spec, model_roots)
    return len(names) if names is not None else _registry_classes().get(spec)


def class_error(ref: Any, spec: str, model_roots: ModelRoots | None = None) -> str | None:
    """What is wrong with class reference `ref` for classifier `spec`, or None."""
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        return f"{ref!r:.100} must be a class index (an integer ≥ 0) or a class name"
    if isinstance(ref, int) and ref < 0:
        return f"class index {ref} must be ≥ 0"
    if isinstance(ref, str) and not 1 <= len(ref) <= MAX_CLASS_NAME:
        return f"a class name has 1 to {MAX_CLASS_NAME} characters, got {len(ref)}"
    return _class_error(ref, spec, _roots_key(model_roots))


@lru_cache(maxsize=CLASS_ERRORS_CACHE, typed=True)  # typed: 1 and 1.0 are different references
def _class_error(ref: int | str, spec: str, roots: Roots) -> str | None:
    names = class_names(spec, roots)
    if names is not None:
        try:
            resolve_class(ref, names)
        except ValueError as exc:
            return f"{exc} ({spec})"
    elif isinstance(ref, int) and (n := class_count(spec, roots)) is not None and ref >= n:
        return f"class index {ref} is out of range: {spec} has {n} classes"
    return None


# --- planning ----------------------------------------------------------------------------------
class _Validator:
    """Normalises item params, running the full validation once per distinct params-without-
    classes, and checks each item's classes."""

    def __init__(
        self,
        kind: str,
        allow_list: list[str] | None,
        allow_paths: bool,
        model_roots: ModelRoots | None = None,
        max_cost: int | None = None,
    ) -> None:
        self.kind, self.allow_list, self.allow_paths = kind, allow_list, allow_paths
        self.model_roots, self.max_cost = model_roots, max_cost
        self._cache: dict[str, tuple[dict[str, Any], str | None] | list[dict[str, str]]] = {}

    def classifier_of(self, params: dict[str, Any]) -> str | None:
        role = CLASSIFIER_FIELD.get(self.kind, ("classifier",))[0]
        value = params.get(role)
        return value if isinstance(value, str) else None

    def __call__(
        self, raw: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None] | list[dict[str, str]]:
        """(normalised params, group key), or the errors ({field: 'params.…', message})."""
        classes = raw.get("classes")
        cheap = self.kind in CLASS_ONLY_KINDS and isinstance(classes, list) and classes
        rest = {k: v for k, v in raw.items() if k != "classes"} if cheap else raw
        key = json.dumps(rest, sort_keys=True, separators=(",", ":"), default=str)
        if key not in self._cache:
            probe = {**rest, "classes": list(classes or [])[:1]} if cheap else raw
            try:
                params = JobCreate(kind=self.kind, params=probe).normalised_params(
                    self.allow_list, allow_paths=self.allow_paths, model_roots=self.model_roots
                )
            except ProblemError as exc:
                self._cache[key] = list(exc.errors or [])
            else:
                too_costly = None if cheap else cost_error(self.kind, params, self.max_cost)
                if too_costly is not None:  # the whole item is validated here: its cost too
                    self._cache[key] = [too_costly]
                else:
                    self._cache[key] = (params, group_key(self.kind, params))
        found = self._cache[key]
        if isinstance(found, list) or not cheap:
            if isinstance(found, list) and cheap:  # the template's errors, without class noise
                return [e for e in found if not e["field"].startswith("params.classes")] or found
            return found
        params, gkey = found
        assert isinstance(classes, list)
        if len(classes) > MAX_CLASSES_PER_ITEM:
            message = f"at most {MAX_CLASSES_PER_ITEM} classes, got {len(classes)}"
            return [{"field": "params.classes", "message": message}]
        spec = self.classifier_of(params) or ""
        errors = []
        for i, ref in enumerate(classes):
            problem = class_error(ref, spec, self.model_roots)
            if problem is not None:
                errors.append({"field": f"params.classes.{i}", "message": problem})
        if errors:
            return errors
        item = {**params, "classes": list(classes)}
        if (too_costly := cost_error(self.kind, item, self.max_cost)) is not None:
            return [too_costly]  # each item's own cost: its classes count
        return item, gkey


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, nested dicts merged (an item's `guidance.iterations` keeps the
    template's other guidance fields)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _relabel(errors: list[dict[str, str]], prefix: str) -> list[dict[str, str]]:
    return [
        {**e, "field": prefix + e["field"].removeprefix("params")}
        if e["field"].startswith("params")
        else e
        for e in errors
    ]


def plan_batch(
    body: BatchCreate,
    *,
    allow_list: list[str] | None,
    allow_paths: bool,
    max_items: int,
    model_roots: ModelRoots | None = None,
    max_cost: int | None = None,
) -> BatchPlan:
    """Every item of the batch, validated; raises a 422 ProblemError naming the first bad items
    (`items[17].params.guidance.iterations`, `classes[3]`, `classifiers[1]`; planning stops at
    MAX_ERRORS of them) and writes nothing. More than `max_items` items is an error too.

    `model_roots`: the folders that specs naming local paths must lie in (the settings'
    `model_path_roots`; `digin.core.registry.check_model_roots`); None, any path, except that
    without `allow_paths` (production) None means no folder but the bundled digits zoo.
    `max_cost` (DIGIN_MAX_JOB_COST; None: no cap): every item's estimated cost
    (`digin.core.limits.estimate_cost`) must be at most this, else its error names the estimate."""
    if model_roots is None and not allow_paths:
        model_roots = ()
    validate = _Validator(body.kind, allow_list, allow_paths, model_roots, max_cost)
    plan = BatchPlan(body.kind, [], {})
    expand = _explicit_items if body.items else _axis_items
    items = expand(body, validate, plan)
    for item in items:
        if len(plan.errors) >= MAX_ERRORS:
            break
        if len(plan.items) >= max_items:
            message = (f"the batch expands to more than {max_items} items, the limit "
                       "(DIGIN_MAX_ITEMS_PER_BATCH); split it")  # fmt: skip
            plan.errors.append({"field": "items" if body.items else "classes", "message": message})
            break
        plan.items.append(item)
    if not plan.items and not plan.errors:
        plan.errors.append({"field": "classes", "message": "the batch has no items"})
    if plan.errors:
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in plan.errors[:5])
        more = len(plan.errors) - 5
        if len(plan.errors) >= MAX_ERRORS:  # planning stopped there: there may be more
            detail += f"; and more (the first {MAX_ERRORS} are in errors)"
        elif more > 0:
            detail += f"; and {more} more"
        raise ProblemError(
            422, "invalid-batch", f"{detail}; nothing was created",
            errors=plan.errors[:MAX_ERRORS],
        )  # fmt: skip
    return plan


def _explicit_items(
    body: BatchCreate, validate: _Validator, plan: BatchPlan
) -> Iterator[PlannedItem]:
    assert body.items is not None
    plan.spec = {"items": len(body.items)}
    base_seed = secrets.randbelow(2**31)
    for i, item in enumerate(body.items):
        raw = _merge(body.params_template, item.params)
        found = validate(raw)
        if isinstance(found, list):
            plan.errors += _relabel(found, f"items[{i}].params")
            if len(plan.errors) >= MAX_ERRORS:
                return
            continue
        params, gkey = found
        seed = item.seed if item.seed is not None else base_seed
        yield PlannedItem(i, item.custom_id, params, seed, gkey)


def _axis_items(body: BatchCreate, validate: _Validator, plan: BatchPlan) -> Iterator[PlannedItem]:
    template = copy.deepcopy(body.params_template)
    if body.images_per_class is not None:
        template["images_per_class"] = body.images_per_class
    roles = CLASSIFIER_FIELD.get(body.kind, ("classifier",))
    # the models axis: (field → spec) per entry, and its label in custom ids
    models: list[tuple[dict[str, str], str | None, str]] = []
    if body.classifier_pairs is not None:
        if len(roles) != 2:
            message = f"only disagreement takes classifier pairs; use classifiers for {body.kind}"
            plan.errors.append({"field": "classifier_pairs", "message": message})
            return
        for i, (a, b) in enumerate(body.classifier_pairs):
            models.append(({roles[0]: a, roles[1]: b}, f"classifier_pairs[{i}]", f"{a},{b}"))
    elif body.classifiers is not None:
        if len(roles) != 1:
            message = "the disagreement kind takes classifier_pairs ([[classifier1, classifier2]])"
            plan.errors.append({"field": "classifiers", "message": message})
            return
        for i, spec in enumerate(body.classifiers):
            models.append(({roles[0]: spec}, f"classifiers[{i}]", spec))
    else:
        label = ",".join(str(template.get(r) or "") for r in roles) or "default"
        models.append(({}, None, label))
    seeds = body.seeds if body.seeds is not None else [secrets.randbelow(2**31)]
    plan.spec = {
        "classes": body.classes.model_dump()
        if isinstance(body.classes, ClassRange)
        else body.classes,
        "classifiers": body.classifiers,
        "classifier_pairs": body.classifier_pairs,
        "seeds": seeds,
        "images_per_class": body.images_per_class,
    }
    index = 0
    for overrides, field_name, label in models:
        base = {**template, **overrides}
        if body.classes == "all":  # the entry's own errors (e.g. its spec) before its classes
            probe = validate({**base, "classes": [0]})
            if isinstance(probe, list):
                errors = _axis_errors(probe, field_name, None, overrides)
                if errors := [e for e in errors if e["field"] != "classes"]:
                    plan.errors += errors
                    if len(plan.errors) >= MAX_ERRORS:
                        return
                    continue
        classes = _classes_axis(body, base, validate, plan)
        if len(plan.errors) >= MAX_ERRORS:
            return
        if classes is None:
            continue
        for position, ref in classes:
            raw = {**base, "classes": [ref]} if ref is not None else base
            found = validate(raw)
            if isinstance(found, list):
                errors = _axis_errors(found, field_name, position, overrides)
                plan.errors += errors
                if len(plan.errors) >= MAX_ERRORS:
                    return
                if any(not e["field"].startswith("classes") for e in errors):
                    break  # the same error for every class: report it once per model
                continue
            params, gkey = found
            for seed in seeds:
                cls = "" if ref is None else f"c={ref}|"
                yield PlannedItem(index, f"{cls}m={label}|s={seed}", params, seed, gkey)
                index += 1


def _axis_errors(
    errors: list[dict[str, str]], model_field: str | None, position: int | None,
    overrides: dict[str, str],
) -> list[dict[str, str]]:  # fmt: skip
    out = []
    for e in errors:
        name = e["field"].removeprefix("params.")
        if name == "params":  # the item as a whole (its estimated cost): the template's doing
            out.append({**e, "field": "params_template"})
        elif name.startswith("classes"):
            out.append({**e, "field": "classes" if position is None else f"classes[{position}]"})
        elif model_field is not None and name.split(".")[0] in overrides:
            out.append({**e, "field": model_field})
        else:
            out.append({**e, "field": "params_template." + name})
    return out


def _classes_axis(
    body: BatchCreate, base: dict[str, Any], validate: _Validator, plan: BatchPlan
) -> list[tuple[int | None, Any]] | None:
    """(position in the request, class reference) of the classes axis for one model entry;
    [(None, None)] when there is no classes axis (the template holds the classes)."""
    classes = body.classes
    if classes is None:
        return [(None, None)]
    if isinstance(classes, list):
        return list(enumerate(classes))
    if classes == "all":
        spec = validate.classifier_of(base) or _default_classifier(body.kind, base, validate)
        n = class_count(spec, validate.model_roots) if spec else None
        if n is None:
            message = (
                f"'all' needs a classifier whose classes are known (the registry, GET /v1/models, "
                f"or the digits zoo); {spec!r} is not: list the classes or give a range"
            )
            plan.errors.append({"field": "classes", "message": message})
            return None
        return [(None, i) for i in range(n)]
    return [(None, i) for i in range(classes.start, classes.stop)]


def _default_classifier(kind: str, base: dict[str, Any], validate: _Validator) -> str | None:
    """The classifier the params default to (from the kind's model), for `classes: "all"`."""
    from digin.core.params import PARAMS_BY_KIND

    role = CLASSIFIER_FIELD.get(kind, ("classifier",))[0]
    model_field = PARAMS_BY_KIND[kind].model_fields.get(role)
    default = None if model_field is None else model_field.default
    return default if isinstance(default, str) else None
