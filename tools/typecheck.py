"""Type-check the project under its installed names (`make lint` runs this).

The repository keeps its top-level folders (core/, api/, service/, worker/) and installs them as
`digin.core`, `digin.api`, ... through the build configuration's package mapping. mypy does not
follow the import hook of an editable install, so this script lays out the same names as a tree
of symbolic links under `.typecheck/` (ignored by git) and runs mypy on the package `digin`
there: strict on the service packages, the pyproject's relaxed settings on `digin.core`.
Errors name files under `.typecheck/digin/<folder>/`, which is the folder of the same name here.

    python tools/typecheck.py [extra mypy arguments]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / ".typecheck"


def mapped_folders() -> dict[str, Path]:
    """Installed package name -> repository folder, from pyproject's package-dir."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in config["package-dir"].items()}


def build_tree() -> Path:
    """`.typecheck/digin/`: links to the files of digin/ and to each mapped folder."""
    shutil.rmtree(TREE, ignore_errors=True)
    package = TREE / "digin"
    package.mkdir(parents=True)
    for entry in (ROOT / "digin").iterdir():
        if entry.suffix == ".py":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapped_folders().items():
        parts = name.split(".")
        assert parts[0] == "digin" and len(parts) == 2, f"unexpected mapping {name}"
        (package / parts[1]).symlink_to(folder, target_is_directory=True)
    return package


def main(argv: list[str]) -> int:
    build_tree()
    env = {**os.environ, "MYPYPATH": str(TREE)}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    return subprocess.call([*cmd, "-p", "digin", *argv], cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
