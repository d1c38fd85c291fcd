"""Job parameters of every kind: validated once, shared by the CLI, the API and the workers.

Torch-free (pydantic only). Each kind's model fills in its defaults, so the stored, normalised
params say exactly what ran; `guidance` is the core's frozen `GuidanceConfig` itself.

Models default to the bundled digits zoo (docs/architecture.md §6.4), so a job runs offline
without naming any.
With a digits diffusion model, the guidance settings and prompts not given in the params are the
zoo's (`digin.core.digits.settings`) rather than the Stable Diffusion defaults (docs/architecture.md
§3).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from digin.core.config import GuidanceConfig, RegularizerWeights, apply_preset
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.digits import settings as digits_settings
from digin.core.registry import max_resolution

TARGET_SETS = r"^(others|wordnet(:\d{1,4})?)$"  # counterfactual targets named as a set
ClassRef = Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1, max_length=200)]
ModelSpec = Annotated[str, Field(min_length=1, max_length=500)]

DEFAULT_CLASS_PROMPT = "a photograph of a {class}"
DEFAULT_PLAIN_PROMPT = "a photograph"
DEFAULT_DIFFUSION = "digits"
DEFAULT_CLASSIFIER = "digits:cnn"


def is_digits_diffusion(spec: str) -> bool:
    """Whether `spec` names the zoo's diffusion model ('digits' or 'digits@<dir>')."""
    return spec == "digits" or spec.startswith("digits@")


def resolution_for_model(value: int | None, info: ValidationInfo) -> int | None:
    """A `resolution` validator: at most the largest side the params' diffusion model may be
    asked for (`digin.core.registry.max_resolution`: a multiple of its native side per family,
    else the general bound; docs/architecture.md §9.7)."""
    spec = info.data.get("diffusion")
    if value is None or not isinstance(spec, str):
        return value
    bound = max_resolution(spec)
    if value > bound.side:
        raise ValueError(
            f"resolution {value} is above {bound.side}, the largest image side for the "
            f"diffusion model {spec!r} ({bound.rule()})"
        )
    return value


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
        description="guidance settings (docs/architecture.md §3); fields not given take the "
        "defaults (the digits zoo's "
        "for a digits diffusion model)",
    )
    regularizers: RegularizerWeights = Field(
        default_factory=RegularizerWeights,
        description="weights of distances to each item's unoptimised sample added to the loss "
        "(docs/architecture.md §3.12); all 0: none",
    )

    _resolution = field_validator("resolution")(resolution_for_model)

    @model_validator(mode="before")
    @classmethod
    def _digits_guidance_defaults(cls, raw: Any) -> Any:
        """The digits zoo's guidance settings, then the named preset's (`guidance.preset`),
        under the fields the params give."""
        if not isinstance(raw, dict):
            return raw
        diffusion = raw.get("diffusion", DEFAULT_DIFFUSION)
        guidance = raw.get("guidance", {})
        digits = isinstance(diffusion, str) and is_digits_diffusion(diffusion)
        if isinstance(guidance, dict) and (digits or "preset" in guidance):
            base = asdict(digits_settings.DIGITS_GUIDANCE) if digits else None
            return {**raw, "guidance": apply_preset(guidance, base)}
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


class _PaperSettings(BaseModel):
    """Options that reproduce the paper's official prompts and starting noise."""

    class_names: Literal["ours", "official"] = Field(
        default="ours",
        description="class names in the prompts: ours (open_clip's ImageNet names) or, for "
        "ImageNet-1k classifiers, 'official': the paper's code's (the first WordNet lemma, e.g. "
        "'hammerhead', 'kite'; docs/differences.md)",
    )
    latents: Literal["ours", "official"] = Field(
        default="ours",
        description="z_T: ours (item i drawn from its own stream, seed + i) or 'official': the "
        "paper's code's bank (torch.manual_seed(0), one z_T per class index and image; ignores "
        "the seed; every item needs a class)",
    )


class GuidedParams(_PaperSettings, _Generative):
    """`guided`: images of class y that the classifier is confident about, CE(f(x), y)."""

    classifier: ModelSpec = DEFAULT_CLASSIFIER
    classes: list[ClassRef] = Field(min_length=1, max_length=1000)
    loss: Literal["ce", "conf"] = Field(
        default="ce", description="ce: −log p(y|x); conf: −p(y|x) (docs/architecture.md §4.3)"
    )


class DisagreementParams(_PaperSettings, _Generative):
    """`disagreement`: images of class y that classifier1 finds and classifier2 does not."""

    classifier1: ModelSpec = "digits:cnn-spurious"
    classifier2: ModelSpec = DEFAULT_CLASSIFIER
    classes: list[ClassRef] = Field(min_length=1, max_length=1000)
    loss: Literal["conf", "log_conf", "logits"] = "conf"


class NeuronParams(_PaperSettings, _Generative):
    """`neuron`: images that drive a penultimate unit up (or down while keeping a class)."""

    classifier: ModelSpec = DEFAULT_CLASSIFIER
    neurons: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=1000)
    classes: list[ClassRef] | None = Field(
        default=None,
        description="one class for all neurons, or one per neuron; needed by the keep modes",
    )
    mode: Literal["activate", "suppress", "activate_keep_class", "suppress_keep_class"] = "activate"
    foreground_blend: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.0,
        description="keep the unoptimised sample's foreground (the class words' cross-attention "
        "mask) for this share of the first steps; the paper's neuron script: 0.3; needs classes "
        "and a prompt with '{class}' (docs/architecture.md §4.3)",
    )

    @model_validator(mode="after")
    def _classes_match(self) -> NeuronParams:
        if self.classes is not None and len(self.classes) not in (1, len(self.neurons)):
            raise ValueError(
                f"classes must hold 1 or {len(self.neurons)} entries (one per neuron), "
                f"got {len(self.classes)}"
            )
        if self.mode.endswith("_keep_class") and self.classes is None:
            raise ValueError(f"mode {self.mode!r} needs classes (the class to keep)")
        no_class = self.prompt is not None and "{class}" not in self.prompt  # None: the default
        if self.foreground_blend > 0 and (self.classes is None or no_class):
            raise ValueError(
                "foreground_blend needs classes and a prompt with '{class}': the mask is the "
                "cross-attention of the class words"
            )
        return self


# --- neural PCA, its components, spurious scores (loaded by digin.core.imagesets) ----------

DIGITS_SIDE = 16  # image side of the digits zoo (digin.core.digits.data.RESOLUTION, a torch module)
MAX_SET_IMAGES = 10_000  # images per image set
MAX_PCA_FEATURES = 65_536  # penultimate features of a PCA passed in the params


class PatchPlan(BaseModel):
    """The zoo's planted patch (`digin.core.digits.data.PatchSpec`) in a share of a digits image
    set: exactly round(rate · N) of the N images, a seeded choice, carry it. Position, size and
    intensity not given are those of the classifier's zoo folder (its model card's patch; the
    default 3x3 square at the top-left, intensity 1.0, for a classifier outside the zoo)."""

    model_config = ConfigDict(extra="forbid")

    rate: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # share of the images with the patch
    opacity: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # 1: the plain patch; less: blended
    seed: Annotated[int, Field(ge=0)] = 0  # which images get it
    top: Annotated[int, Field(ge=0, lt=DIGITS_SIDE)] | None = None  # None: the zoo card's
    left: Annotated[int, Field(ge=0, lt=DIGITS_SIDE)] | None = None
    size: Annotated[int, Field(ge=1, le=DIGITS_SIDE)] | None = None
    intensity: Annotated[float, Field(gt=0.0, le=1.0)] | None = None

    @model_validator(mode="after")
    def _inside(self) -> PatchPlan:
        # fields not given are the zoo card's: checked up front at their smallest (0 and 1), and
        # again once the card fills them in (`digin.core.imagesets.planted_patch`)
        top, left, size = self.top or 0, self.left or 0, self.size or 1
        if max(top, left) + size > DIGITS_SIDE:
            raise ValueError(
                f"the patch ({self.size}px at top={self.top}, left={self.left}) must lie inside "
                f"the {DIGITS_SIDE}x{DIGITS_SIDE} digits"
            )
        return self


class ImageSetSpec(BaseModel):
    """A set of images from exactly one source: the bundled digits (`digits`: a split, with
    `labels` and an optional `patch`), a folder of image files, or uploaded image ids (resolved
    by the service). A string is short for a source: 'digits:<split>', else a folder path."""

    model_config = ConfigDict(extra="forbid")

    digits: Literal["train", "test", "judge"] | None = Field(
        default=None, description="a split of the bundled digits data (docs/architecture.md §6.4)"
    )
    labels: Literal["class", "other", "all"] | list[Annotated[int, Field(ge=0, le=9)]] | None = (
        Field(
            default=None,
            description="digits only: 'class' (the job's class; the default), 'other' (every "
            "other digit), 'all', or a list of digits",
        )
    )
    patch: PatchPlan | None = Field(default=None, description="digits only: plant the patch")
    folder: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        default=None,
        description="a folder of .png/.jpg/.jpeg/.bmp/.webp files; '{class}' and '{index}' are "
        "replaced by the class name and index (one folder per class)",
    )
    image_ids: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=200)]],
            Field(min_length=1, max_length=MAX_SET_IMAGES),
        ]
        | None
    ) = Field(default=None, description="ids of uploaded images (POST /v1/images)")
    limit: Annotated[int, Field(ge=1, le=MAX_SET_IMAGES)] | None = Field(
        default=None, description="use at most this many images (the first ones, in order)"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            if raw.startswith("digits:"):
                return {"digits": raw.removeprefix("digits:")}
            return {"folder": raw}
        return raw

    @model_validator(mode="after")
    def _one_source(self) -> ImageSetSpec:
        given = [n for n in ("digits", "folder", "image_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one source of images (digits, folder or image_ids), got {given}"
            )
        if self.digits is None and (self.labels is not None or self.patch is not None):
            raise ValueError("labels and patch apply to the digits source only")
        return self


class PcaData(BaseModel):
    """A neural PCA as written by `neural_pca` (the "pca" block of its result.json)."""

    model_config = ConfigDict(extra="forbid")

    classifier: ModelSpec | None = None  # the classifier it was computed for
    class_index: Annotated[int, Field(ge=0)] | None = None  # the class k
    class_name: str | None = None
    mean: list[float] = Field(min_length=1, max_length=MAX_PCA_FEATURES)  # μ (F,)
    components: list[list[float]] = Field(min_length=1, max_length=4096)  # v_l, rows (L, F)
    explained_variance: list[float] | None = None
    explained_variance_ratio: list[float] | None = None
    num_images: int | None = None

    @model_validator(mode="after")
    def _shapes(self) -> PcaData:
        bad = [i for i, v in enumerate(self.components) if len(v) != len(self.mean)]
        if bad:
            raise ValueError(
                f"components {bad[:5]} do not have {len(self.mean)} entries (the length of mean)"
            )
        return self


_BY_ALIAS = ConfigDict(
    extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
)


class _ComponentGeneration(_Generative):
    """Generation of images that maximise neural PCA components α_l of class k
    (docs/architecture.md §4.4):
    loss −α_l − keep_class · log p(k|x). `images_per_class` counts images per component."""

    model_config = _BY_ALIAS

    keep_class: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        default=0.5, description="weight of the −log p(k|x) term that keeps the class (0: none)"
    )

    @model_validator(mode="after")
    def _default_prompt(self) -> _ComponentGeneration:
        """The class prompt: the components belong to class k."""
        if self.prompt is None:
            digits = is_digits_diffusion(self.diffusion)
            self.prompt = digits_settings.CLASS_PROMPT if digits else DEFAULT_CLASS_PROMPT
        return self


class PcaVisualization(_ComponentGeneration):
    """The `pca_component` visualisation run by `neural_pca` for its top components."""

    components: Annotated[int, Field(ge=0, le=16)] = Field(
        default=3, description="visualise the top-m components (by explained variance); 0: none"
    )


class NeuralPcaParams(BaseModel):
    """`neural_pca`: PCA of a ⊙ w_k (penultimate features times the class-k weights) over a set
    of class-k images, their component values, the top images per component, and a
    `pca_component` visualisation of the top components."""

    model_config = _BY_ALIAS

    classifier: ModelSpec = DEFAULT_CLASSIFIER
    class_: ClassRef = Field(alias="class", description="the class k (index or name)")
    images: ImageSetSpec = Field(
        default_factory=lambda: ImageSetSpec(digits="train"),
        description="the class-k images; default: the digits train split's class-k digits",
    )
    components: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=64, description="components written to the result (all if fewer features)"
    )
    top_images: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, description="top images per component (highest α_l)"
    )
    grid_components: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, description="components shown in top_images.png"
    )
    visualization: PcaVisualization = Field(default_factory=PcaVisualization)


class PcaComponentParams(_ComponentGeneration):
    """`pca_component`: images that maximise α_l of components of a `neural_pca` result."""

    pca: Annotated[
        Annotated[str, Field(min_length=1, max_length=1000), Tag("path")]
        | Annotated[PcaData, Tag("data")],
        Discriminator(lambda v: "path" if isinstance(v, str) else "data"),
    ] = Field(description="a neural_pca result: the path of its result.json, or its 'pca' block")
    components: list[Annotated[int, Field(ge=0)]] = Field(
        default=[0], min_length=1, max_length=64, description="component indices l (0: the top)"
    )
    classifier: ModelSpec | None = Field(default=None, description="default: the PCA's")
    class_: ClassRef | None = Field(default=None, alias="class", description="default: the PCA's")


class SpuriousScoreParams(BaseModel):
    """`spurious_score`: per class k, the AUC of p(k|x) separating real class-k images from
    images with k's spurious feature but not the class (Spurious ImageNet); their mean."""

    model_config = ConfigDict(extra="forbid")

    classifier: ModelSpec = DEFAULT_CLASSIFIER
    classes: list[ClassRef] = Field(min_length=1, max_length=1000)
    spurious: ImageSetSpec = Field(
        description="images with the spurious feature and without class k ('{class}' in a "
        "folder path: one folder per class; digits: e.g. labels 'other' with a patch)"
    )
    class_images: ImageSetSpec = Field(
        default_factory=lambda: ImageSetSpec(digits="test"),
        description="real class-k images; default: the digits test split's class-k digits",
    )


# --- audits: the per-class step (run by digin.core.audit; the request: digin.core.audit_params)


class AuditImages(BaseModel):
    """The images of an audit, per class, from exactly one source: a split of the bundled digits
    (with the zoo classifier's planted feature at its training rates, from its model card), a
    server folder template with '{class}', or uploaded image ids per class."""

    model_config = ConfigDict(extra="forbid")

    digits: Literal["train", "test", "judge"] | None = Field(
        default=None, description="a split of the bundled digits data (docs/architecture.md §6.4)"
    )
    patch: Literal["training", "none"] = Field(
        default="training",
        description="digits only: 'training' plants the zoo classifier's feature into each "
        "class's digits at the rates of its training (its model card's patch_plan and patch); "
        "'none': clean digits",
    )
    folder: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        default=None, description="a folder template containing '{class}' (one folder per class)"
    )
    image_ids: (
        Annotated[
            dict[
                Annotated[str, Field(min_length=1, max_length=200)],
                Annotated[
                    list[Annotated[str, Field(min_length=1, max_length=200)]],
                    Field(min_length=1, max_length=MAX_SET_IMAGES),
                ],
            ],
            Field(min_length=2, max_length=1000),
        ]
        | None
    ) = Field(
        default=None,
        description="uploaded image ids (POST /v1/images) per class: class name or index → ids",
    )
    per_class: Annotated[int, Field(ge=2, le=MAX_SET_IMAGES)] = Field(
        default=100, description="use at most this many images of each class (the first ones)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> AuditImages:
        given = [n for n in ("digits", "folder", "image_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one source of images (digits, folder or image_ids), got {given}"
            )
        if self.folder is not None and "{class}" not in self.folder:
            raise ValueError(
                f"folder must contain '{{class}}' (one folder per class), got {self.folder!r}"
            )
        return self


class AuditThresholds(BaseModel):
    """When a component of class k counts as a suspected spurious feature."""

    model_config = ConfigDict(extra="forbid")

    auc: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.75,
        description="flag a component whose AUC (p(k|x) of real class-k images against the "
        "other-class images it ranks highest) is below this",
    )
    min_variance_share: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.02, description="examine only components with at least this share of variance"
    )


class AuditImagesRef(BaseModel):
    """`{"audit": true}`: the images of the audit a step belongs to, stored once with the audit
    (`digin.core.audit_params.bind_step` fills them in before the step runs)."""

    model_config = ConfigDict(extra="forbid")

    audit: Literal[True]


class AuditClassParams(BaseModel):
    """`audit_class`: one class k of an audit. Neural PCA of the class-k images; for each top
    component, the images of the other classes ranked by its α_l; the AUC of p(k|x) separating
    the class-k images from the top of that ranking; components with a low AUC flagged."""

    model_config = _BY_ALIAS

    classifier: ModelSpec = DEFAULT_CLASSIFIER
    class_: ClassRef = Field(alias="class", description="the class k (index or name)")
    others: (
        Annotated[list[ClassRef], Field(min_length=1, max_length=1000)] | Literal["all", "audit"]
    ) = Field(
        default="all",
        description="the classes whose images are ranked; 'all': every other; 'audit': the "
        "other classes of the audit this job is a step of (its classes with uploaded ids, or its "
        "other listed classes)",
    )
    images: AuditImages | AuditImagesRef = Field(
        default_factory=lambda: AuditImages(digits="train"),
        description="the images of each class; {'audit': true}: the `images` of the audit this "
        "job is a step of (read from the audit's stored params when the step runs)",
    )
    components: Annotated[int, Field(ge=1, le=64)] = Field(
        default=3, description="top components examined (by explained variance)"
    )
    top_other: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=20,
        description="other-class images at the top of each ranking (the AUC's negatives)",
    )
    shown: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, description="top other-class images shown per component"
    )
    thresholds: AuditThresholds = Field(default_factory=AuditThresholds)
    # the AuditParams that `others: 'audit'` and `images: {'audit': true}` resolve to; set by
    # `digin.core.audit_params.bind_step`, never serialised (the stored params keep the reference)
    _audit: Any = PrivateAttr(default=None)


# --- counterfactuals of real images (run by digin.core.counterfactual.job) ------------------


class CounterfactualParams(BaseModel):
    """`counterfactual`: minimally change a real image so that the classifier predicts each
    target class (docs/architecture.md §5): DDIM + null-text inversion, prompt-to-prompt edit of
    the caption,
    regularised DiG-IN guidance. All targets of the job share one inversion and run as a batch."""

    model_config = ConfigDict(extra="forbid")

    image: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        default=None,
        description="the start image: a file path (PNG, JPEG, WEBP or BMP; at most 4096 x 4096 "
        "pixels) or a bundled digit 'digits:<split>/<n>' (split train, judge or test)",
    )
    image_id: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="an uploaded image's id (POST /v1/images), for the service"
    )
    diffusion: ModelSpec = Field(
        default=DEFAULT_DIFFUSION, description="diffusion model spec; default: the digits zoo's"
    )
    classifier: ModelSpec = DEFAULT_CLASSIFIER
    targets: (
        Annotated[list[ClassRef], Field(min_length=1, max_length=1000)]
        | Annotated[str, Field(pattern=TARGET_SETS)]
    ) = Field(
        description="target classes (indices or names), 'others': every other class, or "
        "'wordnet': the start class's siblings in the WordNet hierarchy (ImageNet-1k; "
        "'wordnet:<n>': the nearest ancestor with at least n classes; docs/architecture.md §5.3)"
    )
    start_class: ClassRef | None = Field(
        default=None, description="the image's class; default: the classifier's prediction"
    )
    caption: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        default=None,
        description="the image's caption, naming the start class (those words are replaced by "
        "the target class); default: the prompt template with the start class",
    )
    prompt: Annotated[str, Field(max_length=1000)] | None = Field(
        default=None,
        description="caption template, '{class}' → the start class; default: 'a photograph of a "
        "{class}' ('a handwritten digit {class}' for the digits zoo)",
    )
    captioner: ModelSpec | None = Field(
        default=None,
        description="captioner spec ('blip:<hub id | dir>'), used only when no caption is given: "
        "it continues the prompt with the start class on the image; default: the prompt alone",
    )
    segmenter: ModelSpec | None = Field(
        default=None,
        description="segmenter spec ('sam:<hub id | dir>', SAM or SAM-HQ) that refines the "
        "cross-attention foreground mask; default: the cross-attention mask alone",
    )
    negative_prompt: Annotated[str, Field(max_length=1000)] = Field(
        default="", description="prompt of ∅ before null-text inversion; '' = the null text"
    )
    resolution: Annotated[int, Field(ge=16, le=2048)] | None = Field(
        default=None, description="image side in pixels; default: the diffusion model's"
    )
    clip_templates: Literal["openai", "simple"] = "openai"
    class_names: Literal["ours", "official"] = Field(
        default="ours",
        description="class names in the caption and the edited prompts: ours, or for ImageNet-1k "
        "classifiers 'official' (the paper's code's)",
    )
    guidance: GuidanceConfig = Field(
        default_factory=GuidanceConfig,
        description="guidance settings (docs/architecture.md §3; the digits zoo's counterfactual "
        "ones for 'digits')",
    )
    counterfactual: CounterfactualConfig = Field(
        default_factory=CounterfactualConfig,
        description="inversion, prompt-to-prompt, mask and regulariser settings "
        "(docs/architecture.md §5)",
    )

    _resolution = field_validator("resolution")(resolution_for_model)

    @model_validator(mode="before")
    @classmethod
    def _digits_defaults(cls, raw: Any) -> Any:
        """The digits zoo's counterfactual settings under the fields the params give."""
        if not isinstance(raw, dict):
            return raw
        targets = raw.get("targets")
        if isinstance(targets, str) and re.fullmatch(TARGET_SETS, targets) is None:
            raise ValueError(
                f"targets must be a list of classes, 'others', 'wordnet' or 'wordnet:<n>', "
                f"got {targets!r}"
            )
        diffusion = raw.get("diffusion", DEFAULT_DIFFUSION)
        out = dict(raw)
        guidance = raw.get("guidance", {})
        if isinstance(guidance, dict) and "preset" in guidance:  # the named preset's settings
            out["guidance"] = apply_preset(guidance)
        if not (isinstance(diffusion, str) and is_digits_diffusion(diffusion)):
            return out
        for name, base in (
            ("guidance", digits_settings.DIGITS_COUNTERFACTUAL_GUIDANCE),
            ("counterfactual", digits_settings.DIGITS_COUNTERFACTUAL),
        ):
            given = raw.get(name, {})
            if isinstance(given, dict):
                given = apply_preset(given) if name == "guidance" else given
                out[name] = {**asdict(base), **given}
        return out

    @model_validator(mode="after")
    def _ddim_only(self) -> CounterfactualParams:
        if self.guidance.solver != "ddim":
            raise ValueError(
                f"guidance.solver must be 'ddim' for counterfactuals (the null-text inversion "
                f"inverts DDIM), got {self.guidance.solver!r}"
            )
        return self

    @model_validator(mode="after")
    def _one_image_and_prompt(self) -> CounterfactualParams:
        if (self.image is None) == (self.image_id is None):
            raise ValueError(
                "give exactly one of image (a file path or 'digits:<split>/<n>') and image_id"
            )
        if self.prompt is None:
            digits = is_digits_diffusion(self.diffusion)
            self.prompt = digits_settings.CLASS_PROMPT if digits else DEFAULT_CLASS_PROMPT
        if "{class}" not in self.prompt and self.caption is None:
            raise ValueError(
                "prompt must contain '{class}' (the start class) unless a caption is given"
            )
        return self

    @property
    def image_is_path(self) -> bool:
        """Whether `image` names a file on the machine that runs the job (a service should
        accept only image_id and bundled digits from its clients)."""
        return self.image is not None and not self.image.startswith("digits:")

    def prompt_for(self, class_name: str) -> str:
        return (self.prompt or "").replace("{class}", class_name)


# --- error visualisation (run by digin.core.misclassified) ----------------------------------

# the fields of CounterfactualParams that every edit of a `misclassified` job shares
EDIT_FIELDS = ("diffusion", "classifier", "prompt", "negative_prompt", "resolution",
               "clip_templates", "class_names", "guidance", "counterfactual")  # fmt: skip


class MisclassifiedParams(BaseModel):
    """`misclassified`: the images of a labelled set that the classifier gets wrong, each edited
    into a counterfactual towards its true class (docs/architecture.md §4.9): the caption names
    the predicted class, the edit replaces it by the true one. The edit settings are those of
    `counterfactual` (and its defaults, the digits zoo's for 'digits')."""

    model_config = ConfigDict(extra="forbid")

    images: ImageSetSpec = Field(
        default_factory=lambda: ImageSetSpec(digits="test", labels="all"),
        description="the labelled images: a digits split (true class: the digit; labels 'all' "
        "or a list of digits), a folder template with '{class}' or '{index}' and `classes` "
        "(true class: the folder's), or image_ids with `labels` (one true class per id)",
    )
    classes: Annotated[list[ClassRef], Field(min_length=1, max_length=1000)] | None = Field(
        default=None, description="folder source only: the classes whose folders are read"
    )
    labels: Annotated[list[ClassRef], Field(min_length=1, max_length=MAX_SET_IMAGES)] | None = (
        Field(default=None, description="image_ids source only: the true class of each image")
    )
    max_images: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, description="edit at most this many misclassified images (the first ones)"
    )
    caption_class: Literal["true", "predicted"] = Field(
        default="true",
        description="the class the caption names (the edit's start class): 'true', as the "
        "paper's code (the edit keeps the caption; the classifier's gradient alone moves it), "
        "or 'predicted' (prompt-to-prompt swaps the predicted class's words for the true one's)",
    )
    diffusion: ModelSpec = DEFAULT_DIFFUSION
    classifier: ModelSpec = DEFAULT_CLASSIFIER
    prompt: Annotated[str, Field(max_length=1000)] | None = Field(
        default=None, description="caption template, '{class}' → the predicted class"
    )
    negative_prompt: Annotated[str, Field(max_length=1000)] = ""
    resolution: Annotated[int, Field(ge=16, le=2048)] | None = None
    clip_templates: Literal["openai", "simple"] = "openai"
    class_names: Literal["ours", "official"] = "ours"
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    counterfactual: CounterfactualConfig = Field(default_factory=CounterfactualConfig)

    _resolution = field_validator("resolution")(resolution_for_model)

    @model_validator(mode="before")
    @classmethod
    def _edit_defaults(cls, raw: Any) -> Any:
        """The counterfactual kind's defaults (the digits zoo's settings for 'digits')."""
        if not isinstance(raw, dict):
            return raw
        # pydantic keeps the validator callable; mypy sees only its decorator proxy
        return CounterfactualParams._digits_defaults(raw)  # type: ignore[operator]

    @model_validator(mode="after")
    def _labelled(self) -> MisclassifiedParams:
        images = self.images
        if images.digits is not None:
            if images.labels is None:
                self.images = images.model_copy(update={"labels": "all"})
            elif images.labels in ("class", "other"):
                raise ValueError("images.labels must be 'all' or a list of digits (no job class)")
        folder = images.folder or ""
        if folder and not ("{class}" in folder or "{index}" in folder):
            raise ValueError(
                "images.folder must contain '{class}' or '{index}': one folder per true class"
            )
        if (self.classes is not None) != bool(folder):
            raise ValueError(
                "classes goes with a folder source (the classes whose folders are read)"
            )
        ids = images.image_ids
        if (self.labels is not None) != (ids is not None):
            raise ValueError("labels goes with an image_ids source (one true class per image)")
        if ids is not None and self.labels is not None and len(self.labels) != len(ids):
            raise ValueError(
                f"labels must hold one class per image id: {len(ids)}, got {len(self.labels)}"
            )
        if self.prompt is None:
            digits = is_digits_diffusion(self.diffusion)
            self.prompt = digits_settings.CLASS_PROMPT if digits else DEFAULT_CLASS_PROMPT
        if "{class}" not in self.prompt:
            raise ValueError("prompt must contain '{class}' (the caption class)")
        return self

    def edit_params(self) -> dict[str, Any]:
        """The shared fields of every edit's CounterfactualParams, as JSON."""
        return self.model_dump(mode="json", include=set(EDIT_FIELDS))


PARAMS_BY_KIND: dict[str, type[BaseModel]] = {
    "guided": GuidedParams,
    "disagreement": DisagreementParams,
    "neuron": NeuronParams,
    "pca_component": PcaComponentParams,
    "neural_pca": NeuralPcaParams,
    "spurious_score": SpuriousScoreParams,
    "counterfactual": CounterfactualParams,
    "misclassified": MisclassifiedParams,
    "audit_class": AuditClassParams,
}
KINDS = tuple(PARAMS_BY_KIND)


def kind_of(params: BaseModel) -> str:
    """The kind whose params model `params` is."""
    for kind, model in PARAMS_BY_KIND.items():
        if type(params) is model:
            return kind
    raise ValueError(f"{type(params).__name__} is the params model of no kind")


# non-generative (digin.core.analysis, digin.core.audit)
ANALYSIS_KINDS = ("neural_pca", "spurious_score", "audit_class")


# Fields that may differ between jobs run as one batched optimisation (`digin.core.groups`): each
# job brings its own items (classes or neurons, images per class) and seeds; everything else
# (models, prompt template, resolution, guidance settings, loss) must be equal.
GROUP_ITEM_FIELDS: dict[str, tuple[str, ...]] = {
    "guided": ("classes", "images_per_class"),
    "disagreement": ("classes", "images_per_class"),
    "neuron": ("neurons", "classes", "images_per_class"),
}


def group_key(kind: str, params: dict[str, Any]) -> str | None:
    """A hash of what jobs must share to run as one batched optimisation: the kind and the
    normalised params without their per-item fields; None for kinds that always run alone."""
    fields = GROUP_ITEM_FIELDS.get(kind)
    if fields is None:
        return None
    shared = {k: v for k, v in params.items() if k not in fields}
    if kind == "neuron":  # the keep-class term exists only with classes
        shared["__has_classes__"] = params.get("classes") is not None
    text = json.dumps([kind, shared], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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
