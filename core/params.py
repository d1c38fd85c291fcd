"""Job parameters of every kind: validated once, shared by the CLI, the API and the workers.

Torch-free (pydantic only). Each kind's model fills in its defaults, so the stored, normalised
params say exactly what ran; `guidance` is the core's frozen `GuidanceConfig` itself.

Models default to the bundled digits zoo (DESIGN §4), so a job runs offline without naming any.
With a digits diffusion model, the guidance settings and prompts not given in the params are the
zoo's (`core.digits.settings`) rather than the Stable Diffusion defaults of DESIGN §3.1.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.config import GuidanceConfig
from core.digits import settings as digits_settings

ClassRef = Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1, max_length=200)]
ModelSpec = Annotated[str, Field(min_length=1, max_length=500)]

DEFAULT_CLASS_PROMPT = "a photograph of a {class}"
DEFAULT_PLAIN_PROMPT = "a photograph"
DEFAULT_DIFFUSION = "digits"
DEFAULT_CLASSIFIER = "digits:cnn"


def is_digits_diffusion(spec: str) -> bool:
    """Whether `spec` names the zoo's diffusion model ('digits' or 'digits@<dir>')."""
    return spec == "digits" or spec.startswith("digits@")


class _Generative(BaseModel):
    """Fields shared by the generative kinds."""

    model_config = ConfigDict(extra="forbid")

    diffusion: ModelSpec = Field(
        default=DEFAULT_DIFFUSION,
        description="diffusion model spec, e.g. 'diffusers:<dir>'; default: the digits zoo's",
    )
    prompt: Annotated[str, Field(max_length=1000)] | None = Field(
        default=None,
        description="prompt template; '{class}' is replaced by the item's class name; default: "
        "'a photograph of a {class}' ('a handwritten digit {class}' for the digits zoo), or "
        "without a class 'a photograph' ('a handwritten digit')",
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
    guidance: GuidanceConfig = Field(
        default_factory=GuidanceConfig,
        description="DESIGN §3.1 settings; fields not given take the defaults (the digits zoo's "
        "for a digits diffusion model)",
    )

    @model_validator(mode="before")
    @classmethod
    def _digits_guidance_defaults(cls, raw: Any) -> Any:
        """The digits zoo's guidance settings under the fields the params give."""
        if not isinstance(raw, dict):
            return raw
        diffusion = raw.get("diffusion", DEFAULT_DIFFUSION)
        guidance = raw.get("guidance", {})
        digits = isinstance(diffusion, str) and is_digits_diffusion(diffusion)
        if digits and isinstance(guidance, dict):
            base = asdict(digits_settings.DIGITS_GUIDANCE)
            return {**raw, "guidance": {**base, **guidance}}
        return raw

    @model_validator(mode="after")
    def _default_prompt(self) -> _Generative:
        """Fill in the prompt template, so the stored params name the prompt that ran."""
        if self.prompt is None:
            digits = is_digits_diffusion(self.diffusion)
            if getattr(self, "classes", None) is None:
                self.prompt = digits_settings.PLAIN_PROMPT if digits else DEFAULT_PLAIN_PROMPT
            else:
                self.prompt = digits_settings.CLASS_PROMPT if digits else DEFAULT_CLASS_PROMPT
        return self

    def prompt_for(self, class_name: str | None) -> str:
        return (self.prompt or "").replace("{class}", class_name or "")


class GuidedParams(_Generative):
    """`guided`: images of class y that the classifier is confident about, CE(f(x), y)."""

    classifier: ModelSpec = DEFAULT_CLASSIFIER
    classes: list[ClassRef] = Field(min_length=1, max_length=1000)


class DisagreementParams(_Generative):
    """`disagreement`: images of class y that classifier1 finds and classifier2 does not."""

    classifier1: ModelSpec = "digits:cnn-spurious"
    classifier2: ModelSpec = DEFAULT_CLASSIFIER
    classes: list[ClassRef] = Field(min_length=1, max_length=1000)
    loss: Literal["conf", "log_conf", "logits"] = "conf"


class NeuronParams(_Generative):
    """`neuron`: images that drive a penultimate unit up (or down while keeping a class)."""

    classifier: ModelSpec = DEFAULT_CLASSIFIER
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
