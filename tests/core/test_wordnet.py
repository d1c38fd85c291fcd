"""WordNet clusters of the ImageNet-1k classes as counterfactual targets (`targets: "wordnet"`)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from digin.core.classes import imagenet_class_names, imagenet_classes
from digin.core.limits import estimate_cost
from digin.core.params import ParamsError, validate_params
from digin.core.wordnet import (
    ancestors,
    cluster,
    parse_wordnet_targets,
    siblings,
    wordnet_target_count,
    wordnet_targets,
)

NAMES = imagenet_class_names()


def index(name: str) -> int:
    return NAMES.index(name)


def test_the_bundled_hierarchy_reaches_entity_from_every_class_and_notes_its_source():
    data = json.loads(
        resources.files("digin.core").joinpath("data", "imagenet_wordnet.json").read_text("utf-8")
    )
    assert "is_a" in data["source"] and "WordNet 3.0" in data["licence"]
    for c in imagenet_classes():
        assert c.wnid in data["parents"] and c.wnid in data["names"]
        assert "n00001740" in ancestors(c.wnid)  # 'entity'
    assert len(data["parents"]) < 2000  # the 1000 classes and their ancestors only


@pytest.mark.parametrize(
    ("name", "ancestor", "members"),
    [
        ("tench", "cyprinid", {"tench", "goldfish"}),
        ("hammerhead shark", "shark", {"great white shark", "tiger shark", "hammerhead shark"}),
        ("lion", "big cat", {"leopard", "snow leopard", "jaguar", "lion", "tiger", "cheetah"}),
        ("analog clock", "clock", {"analog clock", "digital clock", "wall clock"}),
    ],
)
def test_a_cluster_is_the_nearest_ancestor_with_another_class(name, ancestor, members):
    c = cluster(index(name))
    assert c.ancestor_name.split(",")[0] == ancestor
    assert {NAMES[k] for k in c.classes} == members
    assert index(name) not in siblings(index(name))
    assert set(siblings(index(name))) == {index(n) for n in members} - {index(name)}


def test_a_larger_least_size_climbs_to_a_wider_ancestor():
    tench = index("tench")
    assert len(cluster(tench, 3).classes) >= 3 > len(cluster(tench).classes)
    assert set(cluster(tench).classes) < set(cluster(tench, 3).classes)
    assert parse_wordnet_targets("wordnet") == 2 and parse_wordnet_targets("wordnet:5") == 5
    for bad in ("wordnet:1", "wordnet:x", "siblings"):
        with pytest.raises(ValueError, match="wordnet"):
            parse_wordnet_targets(bad)


def test_counterfactual_params_take_wordnet_targets_and_refuse_others():
    for targets in ("wordnet", "wordnet:4", "others"):
        assert validate_params("counterfactual", {"image": "x.png", "targets": targets}).targets
    with pytest.raises(ParamsError, match="'wordnet'"):
        validate_params("counterfactual", {"image": "x.png", "targets": "wordnet:two"})


def test_wordnet_targets_need_imagenet_classes():
    assert wordnet_targets("wordnet", index("tench"), NAMES) == [index("goldfish")]
    with pytest.raises(ValueError, match="ImageNet-1k classifier"):
        wordnet_targets("wordnet", 3, [str(k) for k in range(10)])


def test_the_cost_estimate_counts_the_siblings():
    raw = {"image": "x.png", "targets": "wordnet", "start_class": "hammerhead shark",
           "diffusion": "digits"}  # fmt: skip
    two = estimate_cost("counterfactual", validate_params("counterfactual", raw))
    assert two.describe().startswith("2 targets")
    assert wordnet_target_count("wordnet", None) > 100  # the largest cluster, unknown start
    assert wordnet_target_count("wordnet:3", "tench") == len(cluster(0, 3).classes) - 1
