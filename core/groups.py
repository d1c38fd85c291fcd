"""Several jobs as one batched optimisation: sweeps run compatible items together.

See docs/architecture.md §4.7.

Jobs that share everything but their items (`digin.core.params.group_key`: same kind, models, prompt
template, resolution, guidance settings, loss) run through one optimisation over the items
of all of them, each item with its own seed (job seed + item index, as when the job runs alone),
and the result is split back into one `JobResult` per job. The core's batch dimension keeps
items independent (own z_T, own crops and noise, per-item loss summed), so every job gets the
same images as when it runs by itself, up to float tolerance (tests/worker/test_batching.py).
"""

from __future__ import annotations

import time
from dataclasses import replace

from pydantic import BaseModel

from digin.core.context import ProgressFn, StopFn
from digin.core.guidance import GuidanceResult
from digin.core.jobs import (
    DEFAULT_CACHE,
    Item,
    JobResult,
    ModelCache,
    expand_items,
    generative_params,
    load_job_classifiers,
    make_objective,
    optimize_in_batches,
)
from digin.core.params import GROUP_ITEM_FIELDS, group_key, validate_params


def slice_result(g: GuidanceResult, start: int, stop: int) -> GuidanceResult:
    """Items [start, stop) of a batched result (the item axis: 0 for per-item tensors, 1 for
    per-iteration ones)."""
    return GuidanceResult(
        images=g.images[start:stop],
        best_iteration=g.best_iteration[start:stop],
        trajectory=g.trajectory[:, start:stop],
        clean_loss=g.clean_loss[:, start:stop],
        metrics={k: v[:, start:stop] for k, v in g.metrics.items()},
        train_loss=g.train_loss[:, start:stop],
        latent_norms=g.latent_norms[:, start:stop],
        final_latents=g.final_latents[start:stop],
        iterations_done=g.iterations_done,
        stopped=g.stopped,
        timings=dict(g.timings),
    )


def run_group(
    kind: str,
    jobs: list[tuple[BaseModel | dict, int]],
    *,
    device: str = "cpu",
    cache: ModelCache | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> list[JobResult[Item]]:
    """Run `jobs` ((params, seed) each) of `kind` as ONE optimisation over all their items;
    returns one JobResult per job, in order. The caller sizes the group (memory): no chunking
    happens here. Raises ValueError when the jobs cannot share a run."""
    if kind not in GROUP_ITEM_FIELDS:
        raise ValueError(f"kind {kind!r} does not run in groups; run its jobs one by one")
    if not jobs:
        raise ValueError("run_group needs at least one job")
    t_start = time.perf_counter()
    parsed = [
        generative_params(validate_params(kind, p) if isinstance(p, dict) else p) for p, _ in jobs
    ]
    keys = {group_key(kind, p.model_dump(mode="json")) for p in parsed}
    if len(keys) != 1:
        raise ValueError(
            f"the jobs of a group must share everything but {list(GROUP_ITEM_FIELDS[kind])}"
        )
    params = parsed[0]  # the shared settings
    cache = cache or DEFAULT_CACHE

    # 1. models, loaded once per process
    model = cache.diffusion(params.diffusion, device, params.guidance.weights_precision)
    roles = ["classifier1", "classifier2"] if kind == "disagreement" else ["classifier"]
    specs = {role: getattr(params, role) for role in roles}
    clfs = load_job_classifiers([specs[r] for r in roles], device, params.clip_templates, cache)
    t_loaded = time.perf_counter()

    # 2. every job's items, with the seeds they have when the job runs alone
    per_job = [expand_items(p, clfs[0], seed) for p, (_, seed) in zip(parsed, jobs, strict=True)]
    items = [item for job_items in per_job for item in job_items]
    resolution = params.resolution or model.resolution
    model.latent_shape(resolution)  # fail early on a bad resolution

    # 3. one optimisation over all items (one batch)
    _, result = optimize_in_batches(
        model, items, lambda chunk: make_objective(params, clfs, chunk), params,
        resolution=resolution, max_batch=len(items), progress=progress, should_stop=should_stop,
    )  # fmt: skip
    total_s = time.perf_counter() - t_start

    # 4. split back into one result per job (item indices stay the job's own)
    out, start = [], 0
    for p, (_, seed), job_items in zip(parsed, jobs, per_job, strict=True):
        stop = start + len(job_items)
        out.append(
            JobResult(
                kind=kind,
                params=p.model_dump(mode="json"),
                seed=seed,
                models={"diffusion": p.diffusion, **{r: getattr(p, r) for r in roles}},
                items=[replace(it) for it in job_items],
                guidance=slice_result(result, start, stop),
                device=device,
                timings={
                    "load_s": t_loaded - t_start,
                    "total_s": total_s,
                    "group_jobs": float(len(jobs)),
                    "group_items": float(len(items)),
                },
            )
        )
        start = stop
    return out


def item_count(kind: str, params: BaseModel | dict) -> int:
    """Items (images) a job of `kind` optimises: (classes or neurons) × images per class."""
    p = validate_params(kind, params) if isinstance(params, dict) else params
    refs = getattr(p, "neurons", None) or getattr(p, "classes", None) or []
    return len(refs) * int(getattr(p, "images_per_class", 1))
