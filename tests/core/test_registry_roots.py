"""Model roots (`digin.core.registry.check_model_roots`): a spec naming a local path is accepted
only if the path, as written and with its symbolic links resolved, lies in a root or the bundled
zoo; every refusal is the same text, whatever is (or is not) on the file system."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from digin.core.registry import (
    PATH_OUTSIDE_ROOTS,
    ZOO_DIR,
    check_model_roots,
    local_paths,
    names_server_path,
)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A model root with a zoo and weights, and beside it a secret folder with a zoo-like card
    and a weights file, plus symbolic links from inside the root to outside it."""
    root, secret = tmp_path / "models", tmp_path / "secret"
    for folder in (root / "zoo", secret):
        folder.mkdir(parents=True)
        (folder / "cnn.json").write_text(json.dumps({"class_names": ["private", "keys"]}))
        (folder / "cnn.safetensors").write_bytes(b"weights")
        (folder / "w.safetensors").write_bytes(b"weights")
    (root / "sd" / "unet").mkdir(parents=True)
    (root / "escape").symlink_to(secret, target_is_directory=True)
    (root / "escape.safetensors").symlink_to(secret / "w.safetensors")
    (root / "zoo-link").symlink_to(root / "zoo", target_is_directory=True)  # stays inside
    (tmp_path / "outside-link").symlink_to(root / "zoo", target_is_directory=True)
    return {"root": root, "secret": secret, "tmp": tmp_path}


def outside_specs(layout: dict[str, Path]) -> list[str]:
    root, secret, tmp = layout["root"], layout["secret"], layout["tmp"]
    return [
        f"digits:cnn@{secret}",  # exists, outside
        f"digits:cnn@{tmp / 'nowhere'}",  # does not exist, outside
        "digits:cnn@/etc",
        f"digits:cnn@{root}/../secret",  # '..' out of the root
        f"digits:cnn@{root}/zoo/../../secret",
        f"digits:cnn@{root}/escape",  # a link in the root to a folder outside it
        f"digits@{root}/escape",
        f"digits:cnn@{tmp}/outside-link",  # a link outside the root, even though it points in
        f"digits:cnn@{root}x",  # a sibling whose name starts with the root's
        f"timm:resnet18@{secret}/w.safetensors",
        f"timm:resnet18@{secret}/missing.safetensors",
        f"timm:resnet18@{root}/escape.safetensors",  # a file link to outside
        f"timm:resnet18@{root}/../secret/w.safetensors",
        "timm:resnet18@/any/file.safetensors",
        "timm:resnet18@relative/w.safetensors",  # relative to the working folder
        f"open_clip:ViT-B-16/{secret}/w.safetensors",
        "open_clip:ViT-B-16/weights.safetensors",
        f"diffusers:{secret}",
        "diffusers:/srv/sd",
        "diffusers:./sd",
        "diffusers:sd",  # one name: a local folder, not a hub id
        "diffusers:../x/y",
        "diffusers:~/sd",
        "diffusers:owner/..",  # not a hub id: '..' is a path
    ]


def test_paths_outside_the_roots_get_one_answer_that_reveals_nothing(layout):
    roots = [layout["root"]]
    for spec in outside_specs(layout):
        assert check_model_roots(spec, roots) == PATH_OUTSIDE_ROOTS, spec
    # nothing of the file system or of the files in it is in the answer
    for word in ("private", "keys", "exist", "found", str(layout["tmp"]), "json"):
        assert word not in PATH_OUTSIDE_ROOTS


def test_paths_inside_a_root_or_the_bundled_zoo_are_accepted(layout):
    root = layout["root"]
    inside = [
        f"digits:cnn@{root}/zoo",
        f"digits:cnn@{root}/zoo/",
        f"digits:cnn@{root}/zoo-link",  # a link that stays inside the root
        f"digits:cnn@{root}/sd/../zoo",  # '..' that stays inside
        f"digits:cnn@{root}/not-yet-there",  # inside; the worker says if it is missing
        f"digits@{root}/zoo",
        f"timm:resnet18@{root}/zoo/w.safetensors",
        f"open_clip:ViT-B-16/{root}/zoo/w.safetensors",
        f"diffusers:{root}/sd",
        f"digits:cnn@{ZOO_DIR}",  # the bundled zoo, with no root configured
        f"digits@{ZOO_DIR}",
    ]
    for spec in inside:
        assert check_model_roots(spec, [root]) is None, spec
    assert check_model_roots(f"digits:cnn@{ZOO_DIR}", []) is None
    assert check_model_roots(f"digits:cnn@{root}/zoo", []) == PATH_OUTSIDE_ROOTS


def test_specs_without_local_paths_need_no_root():
    for spec in (
        "digits",
        "digits:cnn",  # the server's own zoo (no '@')
        "timm:resnet50.a1_in1k",
        "timm:resnet50@s3://bucket/ft.safetensors",  # remote: fetched, not a server path
        "open_clip:ViT-B-16/laion2b_s34b_b88k",
        "diffusers:stabilityai/stable-diffusion-2-1-base",
    ):
        assert local_paths(spec) == [], spec
        assert check_model_roots(spec, []) is None, spec
        assert not names_server_path(spec)


def test_no_roots_means_any_path_and_bad_arguments_are_refused(layout):
    assert check_model_roots("digits:cnn@/etc", None) is None  # digin run: the user's machine
    with pytest.raises(TypeError, match="sequence of folders"):
        check_model_roots("digits:cnn@/etc", "/etc")
    with pytest.raises(ValueError, match="invalid model spec"):
        check_model_roots("nonsense", [layout["root"]])


def test_a_hub_id_is_decided_from_the_spec_not_from_local_folders(layout, monkeypatch):
    """`owner/name` is a hub id even where a folder of that name exists: the answer never
    depends on the file system."""
    monkeypatch.chdir(layout["tmp"])
    assert not names_server_path("diffusers:models/sd")
    (layout["tmp"] / "elsewhere").mkdir()
    assert not names_server_path("diffusers:elsewhere/sd")


def test_the_files_a_spec_reads_are_its_local_paths():
    assert local_paths("digits:cnn@/z") == ["/z", "/z/cnn.safetensors", "/z/cnn.json"]
    assert local_paths("digits@/z") == [
        "/z",
        "/z/digits.safetensors",
        "/z/digits.json",
        "/z/digits-tokenizer",
    ]
    assert local_paths("timm:r@/w/x.safetensors") == ["/w/x.safetensors", "/w/x.json"]
    assert local_paths("open_clip:A/w/x.safetensors") == ["w/x.safetensors", "w/A.json"]
    assert local_paths("diffusers:/srv/sd") == ["/srv/sd"]


def test_a_file_link_inside_the_zoo_folder_to_outside_is_refused(layout):
    """The files the spec reads in an allowed folder are checked too (a card linked out)."""
    zoo = layout["root"] / "linked-zoo"
    zoo.mkdir()
    (zoo / "cnn.json").symlink_to(layout["secret"] / "cnn.json")
    assert check_model_roots(f"digits:cnn@{zoo}", [layout["root"]]) == PATH_OUTSIDE_ROOTS
    assert check_model_roots(f"digits:mlp@{zoo}", [layout["root"]]) is None


def test_a_root_that_is_itself_a_link_matches_as_written_and_as_resolved(layout):
    alias = layout["tmp"] / "alias"
    alias.symlink_to(layout["root"], target_is_directory=True)
    assert check_model_roots(f"digits:cnn@{alias}/zoo", [alias]) is None
    # spelled through the real folder, the path is not under the root as written
    assert check_model_roots(f"digits:cnn@{layout['root']}/zoo", [alias]) == PATH_OUTSIDE_ROOTS
    assert os.path.realpath(alias) == os.path.realpath(layout["root"])
