"""ImageNet class names, WordNet ids and class references (digin.core.classes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from digin.core.classes import ClassInfo, imagenet_class_names, imagenet_classes, resolve_class

NAMES = imagenet_class_names()


def test_imagenet_classes_in_index_order():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert [c.index for c in classes] == list(range(1000))
    assert classes[0] == ClassInfo(0, "n01440764", "tench", ("tench", "Tinca tinca"))
    assert classes[999].wnid == "n15075141"  # toilet tissue
    assert len({c.wnid for c in classes}) == 1000
    assert all(c.name and c.lemmas for c in classes)
    assert [c.name for c in classes] == NAMES


def test_matches_the_libraries_it_was_built_from():
    open_clip = pytest.importorskip("open_clip")
    timm = pytest.importorskip("timm")
    info = Path(timm.__file__).parent / "data" / "_info"
    assert list(open_clip.IMAGENET_CLASSNAMES) == NAMES
    wnids = (info / "imagenet_synsets.txt").read_text().split()
    assert [c.wnid for c in imagenet_classes()] == wnids


def test_module_is_torch_free():
    code = (
        "import sys, digin.core.classes as c; c.imagenet_classes(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("ref", "index"),
    [
        (0, 0),
        (999, 999),
        ("1", 1),
        (" 42 ", 42),
        ("tench", 0),
        ("TENCH", 0),
        ("great white shark", 2),
        ("Great_White_Shark", 2),  # underscores and case do not matter
        ("n01443537", 1),  # WordNet id of goldfish
        ("Tinca tinca", 0),  # a WordNet lemma
        ("man-eater", 2),
        ("sunglass", 836),  # lemma of one of the two 'sunglasses' classes
    ],
)
def test_resolve_imagenet(ref, index):
    assert resolve_class(ref, NAMES) == index


def test_resolve_custom_names():
    names = ["cat", "dog", "bird"]
    assert resolve_class("Dog", names) == 1
    assert resolve_class(2, names) == 2
    assert resolve_class("n00000002", names, wnids=["n00000001", "n00000002", "n00000003"]) == 1
    # lemmas only count with the ImageNet names
    with pytest.raises(ValueError, match="unknown class name 'Tinca tinca'"):
        resolve_class("Tinca tinca", NAMES[:10])


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (1000, "class index 1000 is out of range: the classifier has 1000 classes"),
        (-1, "class index -1 is out of range"),
        ("1000", "class index 1000 is out of range"),
        (True, "must be an index or a string"),
        ("n99999999", "WordNet id 'n99999999' is not one of this classifier's 1000 classes"),
        ("tenhc", r"unknown class name 'tenhc' .*did you mean 'tench'"),
        ("xyzzy plugh", r"unknown class name 'xyzzy plugh' \(the classifier has 1000 classes\)$"),
        ("missile", r"'missile' is ambiguous: it matches 657 .*744 .*use an index or WordNet id"),
    ],
)
def test_resolve_errors(ref, message):
    with pytest.raises(ValueError, match=message):
        resolve_class(ref, NAMES)


def test_resolve_errors_custom_names():
    with pytest.raises(ValueError, match="class index 3 is out of range: the classifier has 3"):
        resolve_class(3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="looks like a WordNet id, but .* have none"):
        resolve_class("n01440764", ["a", "b", "c"])
    with pytest.raises(ValueError, match="did you mean 'cat'"):
        resolve_class("cta", ["cat", "dog"])
    with pytest.raises(ValueError, match="got 1 WordNet ids for 2 class names"):
        resolve_class("cat", ["cat", "dog"], wnids=["n00000001"])
