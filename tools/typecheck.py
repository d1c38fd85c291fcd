"""Type-check the project under its installed names (`make lint` runs this).

The repository keeps its top-level folders (core/, api/, service/, worker/) and installs them as
`digin.core`, `digin.api`, ... through the build configuration's package mapping. mypy does not
follow the import hook of an editable install, so this script lays out the same names as a tree
of symbolic links under `.typecheck/` (ignored by git) and runs mypy on the package `digin` there:
strict on the service packages and the CLI, pyproject's relaxed settings on `digin.core`; then
strict on the client distribution (client/digin_client), which installs under its own name.
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


def build(dest: Path) -> Path:
    """Replace `dest/digin` by links to the files of digin/ and to each mapped folder."""
    package = dest / "digin"
    if package.is_symlink() or package.is_file():
        package.unlink()
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir(parents=True)
    for entry in (ROOT / "digin").iterdir():
        if entry.suffix == ".py":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapped_folders().items():
        parent, _, child = name.rpartition(".")
        if parent != "digin":
            raise ValueError(f"{name}: only folders mapped to digin.<name> are laid out")
        (package / child).symlink_to(folder, target_is_directory=True)
    return package


def main(argv: list[str]) -> int:
    build(TREE)
    env = {**os.environ, "MYPYPATH": str(TREE)}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    status = subprocess.call([*cmd, "-p", "digin", *argv], cwd=ROOT, env=env)
    client = ROOT / "client" / "digin_client"
    if client.is_dir():
        status |= subprocess.call([*cmd, "--strict", str(client), *argv], cwd=ROOT)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
