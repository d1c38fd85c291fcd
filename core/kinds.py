"""Every job kind in one table: its params model and the function that runs it.

    kind             params (torch-free)   runs in (digin.core.…)
    guided           GuidedParams          jobs.run_generative
    disagreement     DisagreementParams    jobs.run_generative
    neuron           NeuronParams          jobs.run_generative
    pca_component    PcaComponentParams    analysis.run_pca_component
    neural_pca       NeuralPcaParams       analysis.run_neural_pca
    spurious_score   SpuriousScoreParams   analysis.run_spurious_score
    counterfactual   CounterfactualParams  counterfactual.job.run_counterfactual
    audit_class      AuditClassParams      audit.run_audit_class
    misclassified    MisclassifiedParams   misclassified.run_misclassified

Every runner is `run(params, ctx) -> Result`: validated params and a `digin.core.context.RunContext`
(seed, device, model cache, max batch, progress, cancellation, image resolver).

The API validates against `digin.core.params.PARAMS_BY_KIND` (it may not import torch); this table
adds the runners and checks at import that both name the same kinds. `run_job` is what the CLI
(`digin run`) and the workers call. Every result summarises itself (`summary()`, result.json) and
renders its files (`render_artifacts()`, name → bytes; `digin.core.output.render_artifacts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from digin.core.analysis import run_neural_pca, run_pca_component, run_spurious_score
from digin.core.audit import run_audit_class
from digin.core.batching import job_batch
from digin.core.context import ImageResolver, ProgressFn, RunContext, StopFn
from digin.core.counterfactual.job import run_counterfactual
from digin.core.jobs import DEFAULT_CACHE, ModelCache, run_generative
from digin.core.misclassified import run_misclassified
from digin.core.output import Result
from digin.core.params import PARAMS_BY_KIND, ParamsError, validate_params


@dataclass(frozen=True)
class Kind:
    name: str
    params: type[BaseModel]  # validates the job's params (the API's table, torch-free)
    run: Callable[[Any, RunContext], Result]
    # progress steps of a run under a runner's batch limit, known before the models load; None:
    # the run reports its total itself once it knows it (analysis kinds, counterfactuals)
    steps: Callable[[Any, int], int | None]


def generative_steps(params: Any, max_batch: int) -> int:
    """(iterations + 1) per batch of items: the steps `jobs.run_generative` reports."""
    refs = params.neurons if hasattr(params, "neurons") else params.classes
    items = len(refs) * params.images_per_class
    return (params.guidance.iterations + 1) * math.ceil(
        items / job_batch(max_batch, params.guidance)
    )


def _unknown(params: Any, max_batch: int) -> None:
    return None


GENERATIVE = ("guided", "disagreement", "neuron")
_RUNNERS: dict[str, Callable[[Any, RunContext], Result]] = {
    "guided": run_generative,
    "disagreement": run_generative,
    "neuron": run_generative,
    "pca_component": run_pca_component,
    "neural_pca": run_neural_pca,
    "spurious_score": run_spurious_score,
    "counterfactual": run_counterfactual,
    "misclassified": run_misclassified,
    "audit_class": run_audit_class,
}
if set(_RUNNERS) != set(PARAMS_BY_KIND):
    raise RuntimeError(f"kinds without a runner or params: {set(_RUNNERS) ^ set(PARAMS_BY_KIND)}")
KINDS: dict[str, Kind] = {
    k: Kind(k, PARAMS_BY_KIND[k], _RUNNERS[k], generative_steps if k in GENERATIVE else _unknown)
    for k in PARAMS_BY_KIND
}


def run_job(
    kind: str,
    params: BaseModel | dict,
    *,
    seed: int = 0,
    device: str = "cpu",
    cache: ModelCache | None = None,
    max_batch: int = 8,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    image_resolver: ImageResolver | None = None,
) -> Result:
    """Run one job of any kind (raw params are validated first); `progress(step, total, info)`
    reports its steps."""
    if kind not in KINDS:
        raise ParamsError(kind, [{"field": "kind", "message": f"must be one of {list(KINDS)}"}])
    if isinstance(params, dict):
        params = validate_params(kind, params)
    ctx = RunContext(seed, device, cache or DEFAULT_CACHE, max_batch, progress, should_stop,
                     image_resolver)  # fmt: skip
    return KINDS[kind].run(params, ctx)
