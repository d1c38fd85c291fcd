"""ImageNet-1k class names and WordNet ids, and resolving a job's class references.

See docs/architecture.md §6.3.

Torch-free (stdlib only): the API validates class references without importing torch.

``core/data/imagenet_classes.json`` lists the 1000 classes in index order: the readable names are
open_clip's ``IMAGENET_CLASSNAMES`` (the names CLIP prompts use), the WordNet ids and lemmas are
timm's ``imagenet_synsets.txt`` and ``imagenet_synset_to_lemma.txt``.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

_WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class ClassInfo:
    index: int  # position in the classifier's logits
    wnid: str  # WordNet id, e.g. 'n01440764'
    name: str  # readable name, e.g. 'tench'
    lemmas: tuple[str, ...]  # WordNet lemmas, e.g. ('tench', 'Tinca tinca')


@cache
def _imagenet() -> tuple[ClassInfo, ...]:
    data = resources.files("digin.core").joinpath("data")
    text = data.joinpath("imagenet_classes.json").read_text("utf-8")
    rows = json.loads(text)
    return tuple(ClassInfo(r["index"], r["wnid"], r["name"], tuple(r["lemmas"])) for r in rows)


def imagenet_classes() -> list[ClassInfo]:
    """The 1000 ImageNet-1k classes in index order."""
    return list(_imagenet())


def imagenet_class_names() -> list[str]:
    return [c.name for c in _imagenet()]


@cache
def _imagenet_names() -> tuple[str, ...]:
    return tuple(c.name for c in _imagenet())


def _norm(text: str) -> str:
    """Case-, space- and underscore-insensitive form: 'Great_White  Shark' → 'great white shark'."""
    return " ".join(text.replace("_", " ").split()).casefold()


def resolve_class(
    ref: int | str, class_names: Sequence[str], wnids: Sequence[str] | None = None
) -> int:
    """The index of class ``ref`` among ``class_names``.

    ``ref`` is an index (an int or a string of digits), a class name (case-insensitive; with the
    ImageNet names also any WordNet lemma, e.g. 'Tinca tinca'), or a WordNet id ('n01440764',
    looked up in ``wnids``, which default to ImageNet's with the ImageNet names). Raises
    ValueError naming the reference when it matches no class or more than one.
    """
    k = len(class_names)
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        raise ValueError(f"class reference {ref!r} must be an index or a string")
    if isinstance(ref, str) and ref.strip().isdigit():
        ref = int(ref.strip())
    if isinstance(ref, int):
        if not 0 <= ref < k:
            raise ValueError(f"class index {ref} is out of range: the classifier has {k} classes")
        return ref

    text = ref.strip()
    imagenet = tuple(class_names) == _imagenet_names()
    if wnids is None and imagenet:
        wnids = [c.wnid for c in _imagenet()]
    if wnids is not None and len(wnids) != k:
        raise ValueError(f"got {len(wnids)} WordNet ids for {k} class names")
    if _WNID.fullmatch(text):
        if wnids is None:
            raise ValueError(
                f"class {ref!r} looks like a WordNet id, but this classifier's classes have none "
                "(name the class by index or name)"
            )
        if text not in wnids:
            raise ValueError(f"WordNet id {ref!r} is not one of this classifier's {k} classes")
        return list(wnids).index(text)

    # Names first; with the ImageNet names, WordNet lemmas as well.
    key = _norm(text)
    matches = [i for i, name in enumerate(class_names) if _norm(name) == key]
    if not matches and imagenet:
        matches = [c.index for c in _imagenet() if key in map(_norm, c.lemmas)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(
            f"{i} ({class_names[i]!r}{', ' + wnids[i] if wnids is not None else ''})"
            for i in matches
        )
        hint = "an index or WordNet id" if wnids is not None else "an index"
        raise ValueError(f"class name {ref!r} is ambiguous: it matches {listed}; use {hint}")

    vocabulary = {_norm(n): n for n in class_names}
    if imagenet:
        vocabulary |= {_norm(lemma): lemma for c in _imagenet() for lemma in c.lemmas}
    close = difflib.get_close_matches(key, list(vocabulary), n=3)
    hint = f"; did you mean {', '.join(repr(vocabulary[c]) for c in close)}?" if close else ""
    raise ValueError(f"unknown class name {ref!r} (the classifier has {k} classes){hint}")


# --- the class names of the paper's official code ---------------------------------------------

CLASS_NAME_CHOICES = ("ours", "official")


def official_class_names() -> list[str]:
    """The ImageNet-1k names the paper's official code puts into its prompts: the first WordNet
    lemma of each class (its `IDX2NAME`, the classic 'index to labels' list cut at the first
    comma), e.g. 'hammerhead' and 'kite' where ours say 'hammerhead shark' and 'kite (bird of
    prey)'. 363 of the 1000 differ from `imagenet_class_names()`; two names occur twice
    ('crane': 134 the bird, 517 the machine; 'maillot': 638 and 639)."""
    return [c.lemmas[0] for c in _imagenet()]


def prompt_class_names(class_names: Sequence[str], choice: str) -> list[str]:
    """The names that prompts use for a classifier's classes: its own (`choice` 'ours'), or,
    for the ImageNet-1k classes, the official code's ('official'). ValueError naming the field
    for 'official' with any other classes."""
    if choice == "ours":
        return list(class_names)
    if choice != "official":
        raise ValueError(f"class_names must be one of {CLASS_NAME_CHOICES}, got {choice!r}")
    if tuple(class_names) != _imagenet_names():
        raise ValueError(
            "class_names 'official' applies to the ImageNet-1k classes only; this classifier has "
            f"{len(class_names)} other classes (use 'ours')"
        )
    return official_class_names()
