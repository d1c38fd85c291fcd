"""The WordNet hierarchy above the ImageNet-1k classes, and a class's siblings in it.

See docs/architecture.md §5.3.

Torch-free (stdlib only): the API's cost estimate counts a `targets: "wordnet"` counterfactual's
targets without importing torch.

``core/data/imagenet_wordnet.json`` holds the is-a relations (child → parents; WordNet allows
several) of the 1000 classes and all their ancestors up to 'entity' (1860 synsets), with each
synset's words. Source: ImageNet's ``wordnet.is_a.txt`` and ``words.txt``; licence: WordNet 3.0
(Princeton University; both are noted in the file).

Siblings. The paper's official code edits an image towards the other classes of its class's
cluster, from a hand-made table of 128 clusters named by a WordNet ancestor
('cartilaginous fish', 'feline', 'ball', …; some classes are in none). Here the cluster is
computed for every class: the ImageNet classes below the class's nearest ancestor that has at
least ``min_classes`` of them (2: the closest relatives; e.g. tench → {tench, goldfish} under
'cyprinid'). Distance is counted in is-a steps; among ancestors at the same distance (several
parents) the one with fewer classes below it wins, then the smaller WordNet id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from digin.core.classes import imagenet_class_names, imagenet_classes, resolve_class

WORDNET_TARGETS = re.compile(r"wordnet(?::(\d+))?")  # 'wordnet' or 'wordnet:<min classes>'


@dataclass(frozen=True)
class Cluster:
    ancestor: str  # WordNet id of the ancestor, e.g. 'n01439121'
    ancestor_name: str  # its words, e.g. 'cyprinid, cyprinid fish'
    distance: int  # is-a steps from the class up to it
    classes: tuple[int, ...]  # the ImageNet-1k indices below it (the class included), ascending


@cache
def _hierarchy() -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    text = (
        resources.files("digin.core").joinpath("data", "imagenet_wordnet.json").read_text("utf-8")
    )
    data = json.loads(text)
    parents = {w: tuple(ps) for w, ps in data["parents"].items()}
    return parents, data["names"]


@cache
def _classes_below() -> dict[str, frozenset[int]]:
    """Synset → the ImageNet-1k indices at or below it."""
    parents, _ = _hierarchy()
    below: dict[str, set[int]] = {}
    for c in imagenet_classes():
        for w in ancestors(c.wnid):
            below.setdefault(w, set()).add(c.index)
    return {w: frozenset(s) for w, s in below.items()}


def ancestors(wnid: str) -> dict[str, int]:
    """`wnid` and every ancestor → its distance in is-a steps (the shortest path)."""
    parents, _ = _hierarchy()
    if wnid not in parents:
        raise ValueError(f"WordNet id {wnid!r} is not an ImageNet-1k class or an ancestor of one")
    dist, frontier = {wnid: 0}, [wnid]
    while frontier:
        nxt = []
        for w in frontier:
            for p in parents[w]:
                if p not in dist:
                    dist[p] = dist[w] + 1
                    nxt.append(p)
        frontier = nxt
    return dist


def cluster(index: int, min_classes: int = 2) -> Cluster:
    """The cluster of ImageNet-1k class `index`: the classes below its nearest ancestor with at
    least `min_classes` of them (see the module docstring)."""
    classes = imagenet_classes()
    if not 0 <= index < len(classes):
        raise ValueError(f"class index {index} is out of range: ImageNet-1k has 1000 classes")
    if not 2 <= min_classes <= len(classes):
        raise ValueError(f"min_classes must be between 2 and 1000, got {min_classes}")
    below = _classes_below()
    candidates = [
        (d, len(below[w]), w)
        for w, d in ancestors(classes[index].wnid).items()
        if len(below[w]) >= min_classes
    ]
    d, _, w = min(candidates)  # 'entity' holds all 1000
    return Cluster(w, _hierarchy()[1][w], d, tuple(sorted(below[w])))


def siblings(index: int, min_classes: int = 2) -> list[int]:
    """The other classes of class `index`'s cluster, ascending: its counterfactual targets."""
    return [k for k in cluster(index, min_classes).classes if k != index]


def parse_wordnet_targets(targets: str) -> int:
    """'wordnet' → 2, 'wordnet:<n>' → n (the least classes of the cluster, the start included);
    ValueError otherwise."""
    match = WORDNET_TARGETS.fullmatch(targets)
    if match is None:
        raise ValueError(f"targets must be 'others', 'wordnet' or 'wordnet:<n>', got {targets!r}")
    n = int(match.group(1) or 2)
    if not 2 <= n <= 1000:
        raise ValueError(f"targets {targets!r}: the cluster size n must be between 2 and 1000")
    return n


def largest_cluster(min_classes: int = 2) -> int:
    """The most classes any class's cluster holds (the cost estimate without a start class)."""
    return max(len(cluster(k, min_classes).classes) for k in range(len(imagenet_classes())))


def wordnet_targets(targets: str, start: int, class_names: Sequence[str]) -> list[int]:
    """The counterfactual targets that `targets` ('wordnet' or 'wordnet:<n>') names for start
    class `start`: its siblings. ValueError unless the classes are ImageNet-1k's."""
    if tuple(class_names) != tuple(imagenet_class_names()):
        raise ValueError(
            f"targets {targets!r} needs an ImageNet-1k classifier (the WordNet hierarchy of its "
            f"classes); this one has {len(class_names)} other classes: list the targets"
        )
    return siblings(start, parse_wordnet_targets(targets))


def wordnet_target_count(targets: str, start_class: int | str | None) -> int:
    """How many targets 'wordnet[:<n>]' gives (the cost estimate, torch-free): the start class's
    siblings when it is given as an ImageNet-1k class, else the most any class has."""
    n = parse_wordnet_targets(targets)
    if start_class is not None:
        try:
            start = resolve_class(start_class, imagenet_class_names())
        except ValueError:
            start = None  # the job will fail on it; estimate as without a start class
        if start is not None:
            return max(1, len(siblings(start, n)))
    return max(1, _largest_cluster(n) - 1)


@cache
def _largest_cluster(min_classes: int) -> int:
    return largest_cluster(min_classes)
