"""Job parameters of every kind: validated once, shared by the CLI, the API and the workers.

Torch-free (pydantic only). Each kind's model fills in its defaults, so the stored, normalised
params say exactly what ran; `guidance` is the core's frozen `GuidanceConfig` itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.config import GuidanceConfig

ClassRef = Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1, max_length=200)]
ModelSpec = Annotated[str, Field(min_length=1, max_length=500)]

DEFAULT_CLASS_PROMPT = "a photograph of a {class}"
DEFAULT_PLAIN_PROMPT = "a photograph"


class _Generative(BaseModel):
    """Fields shared by the generative kinds."""

    model_config = ConfigDict(extra="forbid")

    diffusion: ModelSpec = Field(description="diffusion model spec, e.g. 'diffusers:<dir>'")
    prompt: Annotated[str, Field(max_length=1000)] | None = Field(
        default=None,
        description="prompt template; '{class}' is replaced by the item's class name",
    )
    negative_prompt: Annotated[str, Field(max_length=1000)] = Field(
        default="", description="prompt of the unconditional branch (∅); '' = the null text"
    )
    resolution: Annotated[int, Field(ge=32, le=2048)] | None = Field(
        default=None, description="image side in pixels; default: the diffusion model's"
    )
    images_per_class: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="items per class (or per neuron), each with its own seed"
    )
    clip_templates: Literal["openai", "simple"] = Field(
        default="openai", description="prompt templates of zero-shot CLIP classifiers"
    )
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)

    def prompt_for(self, class_name: str | None) -> str:
        template = self.prompt
        if template is None:
            template = DEFAULT_PLAIN_PROMPT if class_name is None else DEFAULT_CLASS_PROMPT
        return template.replace("{class}", class_name or "")


class GuidedParams(_Generative):
    """`guided`: images of class y that the classifier is confident about, CE(f(x), y)."""

    classifier: ModelSpec
    classes: list[ClassRef] = Field(min_length=1, max_length=1000)


class DisagreementParams(_Generative):
    """`disagreement`: images of class y that classifier1 finds and classifier2 does not."""

    classifier1: ModelSpec
    classifier2: ModelSpec
    classes: list[ClassRef] = Field(min_length=1, max_length=1000)
    loss: Literal["conf", "log_conf", "logits"] = "conf"


class NeuronParams(_Generative):
    """`neuron`: images that drive a penultimate unit up (or down while keeping a class)."""

    classifier: ModelSpec
    neurons: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=1000)
    classes: list[ClassRef] | None = Field(
        default=None,
        description="one class for all neurons, or one per neuron; needed by the keep modes",
    )
    mode: Literal["activate", "activate_keep_class", "suppress_keep_class"] = "activate"

    @model_validator(mode="after")
    def _classes_match(self) -> NeuronParams:
        if self.classes is not None and len(self.classes) not in (1, len(self.neurons)):
            raise ValueError(
                f"classes must hold 1 or {len(self.neurons)} entries (one per neuron), "
                f"got {len(self.classes)}"
            )
        if self.mode != "activate" and self.classes is None:
            raise ValueError(f"mode {self.mode!r} needs classes (the class to keep)")
        return self


PARAMS_BY_KIND: dict[str, type[BaseModel]] = {
    "guided": GuidedParams,
    "disagreement": DisagreementParams,
    "neuron": NeuronParams,
}
KINDS = tuple(PARAMS_BY_KIND)


class ParamsError(ValueError):
    """Bad job parameters; `errors` lists {field, message} pairs."""

    def __init__(self, kind: str, errors: list[dict[str, str]]) -> None:
        self.kind = kind
        self.errors = errors
        lines = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        super().__init__(f"invalid {kind} params: {lines}")


def validate_params(kind: str, raw: dict[str, Any]) -> BaseModel:
    """Validate raw params of `kind`; raise ParamsError naming each bad field and its limit."""
    if kind not in PARAMS_BY_KIND:
        raise ParamsError(kind, [{"field": "kind", "message": f"must be one of {list(KINDS)}"}])
    try:
        return PARAMS_BY_KIND[kind].model_validate(raw)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "params", "message": e["msg"]}
            for e in exc.errors()
        ]
        raise ParamsError(kind, errors) from None
