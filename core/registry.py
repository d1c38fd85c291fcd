"""Model registry: model specs, the curated models, and where weights come from.

See docs/architecture.md §6.1.

Torch-free on purpose (stdlib + pydantic): the API imports it for ``GET /v1/models`` and the
model allow-list. Spec grammar, one scheme per loader:

    diffusers:<hub id or local dir>          Stable Diffusion 1.x/2.x or SDXL pipeline
    timm:<name>                              timm model with its pretrained weights
    timm:<arch>@<file.safetensors | s3 URI>  timm architecture with a user's own weights
    open_clip:<arch>/<pretrained tag | file> zero-shot CLIP classifier over class names
    digits[@<dir>] | digits:<name>[@<dir>]   the bundled digits zoo (diffusion | classifier);
                                             `@<dir>` reads another zoo folder
    blip:<hub id or local dir>               BLIP captioner (transformers), for counterfactuals
    sam:<hub id or local dir>                SAM or SAM-HQ segmenter (transformers), for
                                             counterfactuals' foreground masks

The curated models live in ``core/data/registry.json``; any other well-formed spec is allowed too
(unless the service's allow-list says otherwise). A service also confines the specs that name
paths on its machines to its model roots (``check_model_roots``); ``digin run`` passes none.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Scheme = Literal["diffusers", "timm", "open_clip", "digits", "blip", "sam"]
Kind = Literal["diffusion", "classifier", "captioner", "segmenter"]

SCHEMES: tuple[Scheme, ...] = ("diffusers", "timm", "open_clip", "digits", "blip", "sam")
# Schemes of models that are one transformers folder (a hub id or a local folder), by kind.
FOLDER_SCHEMES: dict[Scheme, Kind] = {"blip": "captioner", "sam": "segmenter"}
SPEC_FORMS = (
    "diffusers:<hub id or local dir>",
    "timm:<name>",
    "timm:<arch>@<file.safetensors>",
    "open_clip:<arch>/<pretrained tag>",
    "digits[@<zoo dir>]",
    "digits:<name>[@<zoo dir>]",
    "blip:<hub id or local dir>",
    "sam:<hub id or local dir>",
)
ZOO_DIR = Path(__file__).parent / "zoo"  # the bundled digits zoo (docs/architecture.md §6.4)
ZOO_ENV = "DIGIN_ZOO_DIR"  # setting: another zoo folder for every digits spec without '@'
DIGITS_DIFFUSION = "digits"
DIGITS_CLASSIFIERS = ("cnn", "mlp", "cnn-spurious", "judge")
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# A Hugging Face hub id as a diffusers spec names it: '<owner>/<name>', each part starting with a
# letter or digit (so never '.', '..' or '~'); any other diffusers name is a local folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
TOKENIZER_FOLDER = "digits-tokenizer"  # the digits diffusion model's tokenizer, in its zoo folder
ModelRoots = Sequence[str | os.PathLike[str]]
# The one answer to a spec naming a path outside the model roots: the same whether the path
# exists or not, and nothing read from it.
PATH_OUTSIDE_ROOTS = (
    "names a path on the server outside the model folders this service allows "
    "(DIGIN_MODEL_ROOTS; the bundled digits zoo is always allowed)"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec; ``str(spec)`` gives the spec string back."""

    scheme: Scheme
    name: str  # everything after "<scheme>:"; "" for the bundled `digits` diffusion model
    arch: str | None = None  # timm/digits model name (before '@') / open_clip architecture
    weights: str | None = None  # timm: weights file or URI after '@'; open_clip: tag or file;
    # digits: the zoo folder after '@' (None: $DIGIN_ZOO_DIR or the bundled zoo)

    @property
    def kind(self) -> Kind:
        if self.scheme in FOLDER_SCHEMES:
            return FOLDER_SCHEMES[self.scheme]
        if self.scheme == "diffusers" or self.arch == DIGITS_DIFFUSION:
            return "diffusion"
        return "classifier"

    def __str__(self) -> str:
        if self.scheme == "digits" and not self.name:  # the diffusion model: digits[@<dir>]
            return f"digits@{self.weights}" if self.weights else "digits"
        return f"{self.scheme}:{self.name}"


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; a ValueError names the spec, what is wrong and the known forms."""

    def invalid(why: str) -> ValueError:
        return ValueError(
            f"invalid model spec {spec!r}: {why}; known schemes: {', '.join(SCHEMES)} "
            f"(forms: {', '.join(SPEC_FORMS)})"
        )

    if not isinstance(spec, str) or not spec:
        raise invalid("expected a non-empty string")
    if spec != spec.strip():
        raise invalid("leading or trailing whitespace")
    if spec == "digits" or spec.startswith("digits@"):
        if spec == "digits@":
            raise invalid("no zoo folder after '@'")
        return ModelSpec("digits", "", DIGITS_DIFFUSION, _zoo_dir(spec[7:], invalid))
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise invalid("no scheme (expected '<scheme>:<name>')")
    if scheme not in SCHEMES:
        raise invalid(f"unknown scheme {scheme!r}")
    if not rest:
        raise invalid(f"nothing after '{scheme}:'")

    if scheme == "diffusers" or scheme in FOLDER_SCHEMES:
        return ModelSpec(scheme, rest)
    if scheme == "timm":
        arch, at, weights = rest.partition("@")
        if not arch:
            raise invalid("no timm architecture before '@'")
        if not at:
            return ModelSpec("timm", rest, arch=arch)
        if not weights.endswith(".safetensors"):
            raise invalid(
                "the weights after '@' must be a .safetensors file or URI "
                "(pickled checkpoints are never loaded)"
            )
        return ModelSpec("timm", rest, arch=arch, weights=weights)
    if scheme == "open_clip":
        arch, _, tag = rest.partition("/")
        if not arch or not tag:
            raise invalid("expected 'open_clip:<arch>/<pretrained tag>'")
        return ModelSpec("open_clip", rest, arch=arch, weights=tag)
    name, at, folder = rest.partition("@")
    if at and not folder:
        raise invalid("no zoo folder after '@'")
    if name not in DIGITS_CLASSIFIERS:
        raise invalid(
            f"unknown digits classifier {name!r}; the zoo has {', '.join(DIGITS_CLASSIFIERS)} "
            "('digits:<name>') and the diffusion model 'digits'"
        )
    return ModelSpec("digits", rest, name, _zoo_dir(folder, invalid))


def _zoo_dir(folder: str, invalid: Callable[[str], ValueError]) -> str | None:
    """The zoo folder after 'digits…@' ('' for no '@': None)."""
    if folder.strip() != folder:
        raise invalid("the zoo folder after '@' has leading or trailing whitespace")
    return folder or None


def zoo_dir(folder: str | os.PathLike | None = None) -> Path:
    """The digits zoo folder: `folder` (a spec's '@<dir>'), else $DIGIN_ZOO_DIR, else the zoo
    shipped in the package (core/zoo)."""
    if folder:
        return Path(folder).expanduser()
    if env := os.environ.get(ZOO_ENV):
        return Path(env).expanduser()
    return ZOO_DIR


class ModelInfo(BaseModel):
    """One registry entry, as shown by ``digin models`` and ``GET /v1/models``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: str
    kind: Kind
    description: str
    source: str | None  # 'hf-hub:<repo id>', a URL or a local path; None: the library's default
    resolution: int | None  # diffusion: native image side; others: input side (pixels)
    num_classes: int | None
    available: bool  # the weights are present locally (no download needed)


class SchemeInfo(BaseModel):
    """One spec scheme and its general forms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Scheme
    kind: str
    forms: list[str]
    description: str


@lru_cache(maxsize=1)  # the file shipped in the package: read once
def _registry() -> dict[str, Any]:
    data = resources.files("digin.core").joinpath("data")
    text = data.joinpath("registry.json").read_text(encoding="utf-8")
    return json.loads(text)


def list_schemes() -> list[SchemeInfo]:
    return [SchemeInfo.model_validate(s) for s in _registry()["schemes"]]


def list_models() -> list[ModelInfo]:
    """The curated models, each with whether its weights are present on this machine."""
    out = []
    for entry in _registry()["models"]:
        source = weights_source(entry["spec"])  # digits: in the zoo folder in use
        out.append(ModelInfo(**(entry | {"source": source}), available=_source_available(source)))
    return out


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, found as huggingface_hub does (without importing it)."""
    if cache_dir := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def weights_source(spec: str | ModelSpec) -> str | None:
    """Where the weights of ``spec`` would come from: 'hf-hub:<repo id>', a URL or a local path.

    Curated models give their recorded source. None where only the loading library knows (a timm
    name without a pretrained tag, an open_clip pretrained tag that is not curated).
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if parsed.scheme == "digits":
        return str(zoo_dir(parsed.weights) / f"{parsed.arch}.safetensors")
    for entry in _registry()["models"]:
        if entry["spec"] == str(parsed):
            return entry["source"]
    if parsed.scheme == "diffusers" or parsed.scheme in FOLDER_SCHEMES:
        # A hub id always comes from the hub (as the loader reads it), whatever folders of that
        # name exist here; any other name is a local folder.
        if is_hub_id(parsed.name):
            return f"hf-hub:{parsed.name}"
        return str(Path(parsed.name).expanduser())
    if parsed.scheme == "timm":
        if parsed.weights is not None:
            return parsed.weights
        return f"hf-hub:timm/{parsed.name}" if "." in parsed.name else None
    if parsed.scheme == "open_clip":
        tag = parsed.weights or ""
        return tag if tag.endswith(_WEIGHT_FILE_SUFFIXES) or "/" in tag else None
    raise AssertionError(parsed.scheme)


def names_server_path(spec: str | ModelSpec) -> bool:
    """Whether ``spec`` reads weights from a path on the machine that runs it (a local pipeline
    folder, weights file or zoo folder) rather than a hub, a URI or the bundled zoo. A service
    in production refuses such specs from tenants unless the allow-list names them. Decided from
    the spec alone (never from what exists on this machine)."""
    return bool(local_paths(spec))


def is_hub_id(name: str) -> bool:
    """Whether a diffusers, blip or sam name is a hub id ('<owner>/<name>'), not a local folder."""
    return _HUB_ID.fullmatch(name) is not None


def local_paths(spec: str | ModelSpec) -> list[str]:
    """The paths on this machine that ``spec`` reads, as the spec spells them (not resolved):
    the zoo folder after 'digits…@' with the model's files in it, a timm weights file and its
    sidecar JSON, an open_clip weights file and the `<arch>.json` beside it, a diffusers folder.
    Empty for hub ids, URIs, pretrained tags and the server's own zoo (no '@'). Decided from the
    spec alone: nothing on the file system is looked at."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if parsed.scheme == "digits":
        if parsed.weights is None:
            return []
        folder = parsed.weights
        files = [f"{parsed.arch}.safetensors", f"{parsed.arch}.json"]
        if parsed.kind == "diffusion":
            files.append(TOKENIZER_FOLDER)
        return [folder, *(os.path.join(folder, name) for name in files)]
    if parsed.scheme == "diffusers" or parsed.scheme in FOLDER_SCHEMES:
        return [] if is_hub_id(parsed.name) else [parsed.name]
    file = parsed.weights or ""
    if "://" in file:
        return []  # a remote object (s3://, https://), fetched by whoever runs the job
    if parsed.scheme == "timm":
        if parsed.weights is None:
            return []
        return [file, os.path.splitext(file)[0] + ".json"]  # the weights and their sidecar
    # open_clip: a pretrained tag, or a local weights file (as the loader tells them apart)
    if "/" in file or os.sep in file or file.endswith(_WEIGHT_FILE_SUFFIXES):
        return [file, os.path.join(os.path.dirname(file), f"{parsed.arch}.json")]
    return []


def check_model_roots(spec: str | ModelSpec, roots: ModelRoots | None) -> str | None:
    """Why ``spec`` may not be used under the model roots ``roots``, or None.

    ``roots`` None: any path (local use, e.g. ``digin run``). Otherwise every path the spec reads
    (``local_paths``) must lie inside one of the roots or the bundled zoo (core/zoo), both as
    written ('..' collapsed, relative to the working folder) and with every symbolic link
    resolved. A refusal is always ``PATH_OUTSIDE_ROOTS``: it says nothing about the file system
    (whether the path exists, what it holds). A malformed spec raises ValueError (parse_spec).
    """
    if roots is None:
        return None
    if isinstance(roots, str | bytes):
        raise TypeError("roots must be a sequence of folders, not one path")
    paths = local_paths(spec)
    if not paths:
        return None
    folders = [ZOO_DIR, *(Path(root) for root in roots)]
    written = [os.path.abspath(os.path.expanduser(folder)) for folder in folders]
    real = [os.path.realpath(folder) for folder in written]
    for path in paths:
        plain = os.path.abspath(os.path.expanduser(path))
        if not (_inside(plain, written) and _inside(os.path.realpath(plain), real)):
            return PATH_OUTSIDE_ROOTS
    return None


def _inside(path: str, folders: list[str]) -> bool:
    """Whether absolute, normalised ``path`` is one of ``folders`` or lies below one."""
    return any(path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
               for folder in folders)  # fmt: skip


def is_available(spec: str | ModelSpec) -> bool:
    """Whether the weights of ``spec`` are present locally (never downloads anything)."""
    source = weights_source(spec)
    return source is not None and _source_available(source)


def _source_available(source: str | None) -> bool:
    if source is None:
        return False
    if source.startswith("hf-hub:"):
        repo_id = source.removeprefix("hf-hub:")
        snapshots = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        return snapshots.is_dir() and any(snapshots.iterdir())
    if "://" in source:
        return False  # remote (s3://, https://): fetched when a job needs it
    return Path(source).expanduser().exists()


def is_allowed(spec: str, allow_list: Sequence[str] | None) -> bool:
    """Whether ``spec`` passes an allow-list: None allows everything; an entry matches exactly,
    or as a prefix when it ends with '*' (e.g. 'timm:*', 'diffusers:stabilityai/*')."""
    if allow_list is None:
        return True
    if isinstance(allow_list, str):
        raise TypeError("allow_list must be a sequence of specs, not one string")
    return any(
        spec.startswith(entry[:-1]) if entry.endswith("*") else spec == entry
        for entry in allow_list
    )


# --- what a job may ask of a model (docs/architecture.md §9.7) ---------------------------------

# The largest image side a job may ask of a diffusion model, as a multiple of the side it was
# trained at, per family. Latent diffusion (Stable Diffusion 1.x/2.x, SDXL): 2x. These UNets lose
# the image's global layout beyond about twice their side (subjects repeat and tile), while the
# cost grows with the pixel count and the self-attention of the first UNet level with its
# square: 2x is 4x the pixels and 16x the attention of the native side, the last size that
# still gives a useful image. The digits zoo's 16 px pixel-space model: 4x (64 px), a small
# multiple; its images only get blurrier beyond, at 16x the pixels per 2x more side.
RESOLUTION_FACTORS: dict[Scheme, int] = {"diffusers": 2, "digits": 4}
# The bound of a diffusion model whose native side is not known without loading it (a local
# diffusers folder, a hub id that is not curated): the params' own limit.
GENERAL_MAX_RESOLUTION = 2048


@dataclass(frozen=True)
class ResolutionBound:
    """The largest image side (`side`) a job may ask of a diffusion model, and why."""

    side: int
    native: int | None  # the model's native image side, if the registry knows it
    factor: int | None  # side = factor x native (None: the general bound)

    def rule(self) -> str:
        if self.native is None or self.factor is None:
            return (
                f"the general bound {self.side}: the model's native resolution is not known "
                "without loading it"
            )
        return f"{self.factor}x its native {self.native} px"


def _curated_entry(spec: str | ModelSpec) -> dict[str, Any] | None:
    """The registry's entry of `spec` (a digits model in any zoo folder: the bundled zoo's
    entry of that model, the whole zoo being 16 px); None for a model it does not list or a
    malformed spec."""
    try:
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
    except ValueError:
        return None
    key = str(parsed)
    if parsed.scheme == "digits":
        key = DIGITS_DIFFUSION if parsed.kind == "diffusion" else f"digits:{parsed.arch}"
    for entry in _registry()["models"]:
        if entry["spec"] == key and entry["kind"] == parsed.kind:
            return dict(entry)
    return None


def native_resolution(spec: str | ModelSpec) -> int | None:
    """The native image side of a diffusion model as the registry records it (a curated
    diffusers pipeline's, the digits zoo's for every `digits[@<dir>]`); None when unknown (a
    local folder, an uncurated hub id, a malformed spec, a classifier)."""
    entry = _curated_entry(spec)
    return entry["resolution"] if entry is not None and entry["kind"] == "diffusion" else None


def max_resolution(spec: str | ModelSpec) -> ResolutionBound:
    """The largest image side a job may ask of the diffusion model `spec`: its family's factor
    (`RESOLUTION_FACTORS`) times its native side where the registry knows it, never above
    GENERAL_MAX_RESOLUTION; else that general bound."""
    native = native_resolution(spec)
    if native is None:
        return ResolutionBound(GENERAL_MAX_RESOLUTION, None, None)
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    factor = RESOLUTION_FACTORS[parsed.scheme]
    return ResolutionBound(min(factor * native, GENERAL_MAX_RESOLUTION), native, factor)


def classifier_facts(spec: str | ModelSpec) -> tuple[int | None, int | None]:
    """A classifier's (input side, class count) as the registry records them (the digits zoo's
    classifiers in any zoo folder included); None for what it does not know."""
    entry = _curated_entry(spec)
    if entry is None or entry["kind"] != "classifier":
        return None, None
    return entry["resolution"], entry["num_classes"]


def input_side(spec: str | ModelSpec) -> int | None:
    """The image side a curated model works at (a classifier's input, a diffusion model's native
    side, a captioner's or segmenter's input) as the registry records it; None when unknown."""
    entry = _curated_entry(spec)
    return None if entry is None else entry["resolution"]
