"""The development habits the repository enforces: pinned dependencies used by every install,
and pre-commit hooks that run the lint CI runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt: not an exact pin: {line!r}"
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def requirement_names(pyproject: Path) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    return {canonical(re.split(r"[\s\[<>=!~;@]", d, maxsplit=1)[0]) for d in deps}


@pytest.mark.parametrize("pyproject", ["pyproject.toml", "client/pyproject.toml"])
def test_every_declared_dependency_is_pinned(pyproject):
    local = {"digin", "digin-client"}  # this repository's own distributions
    missing = requirement_names(ROOT / pyproject) - set(constraints()) - local
    assert not missing, f"not in constraints.txt (run make constraints): {sorted(missing)}"


def test_the_torch_pins_agree():
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(d.split("==") for d in core["optional-dependencies"]["core"] if "==" in d)
    found = constraints()
    assert found["torch"] == pins["torch"] and found["torchvision"] == pins["torchvision"]


def install_lines(text: str) -> list[str]:
    return re.findall(r"pip install ([^&;\n]+)", text)


@pytest.mark.parametrize(
    "path", ["README.md", ".ci/run", "Makefile", "Dockerfile", "Dockerfile.gpu"]
)
def test_every_install_command_uses_the_constraints(path):
    text = (ROOT / path).read_text().replace("\\\n", " ")
    installs = [i for i in install_lines(text) if "torch" in i or "-e " in i]
    assert installs, f"{path}: no install command found"
    for install in installs:
        assert "-c constraints.txt" in install, f"{path}: {install.strip()}"


def test_pre_commit_runs_the_lint_of_ci():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: (repo, h) for repo in config["repos"] for h in repo["hooks"]}
    assert {"ruff", "ruff-format", "mypy"} <= set(hooks)
    ruff_repo, _ = hooks["ruff"]
    assert ruff_repo["rev"] == "v" + constraints()["ruff"], (
        "pre-commit's ruff is not the pinned one"
    )
    assert "tools/typecheck.py" in hooks["mypy"][1]["entry"]
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("ruff check .", "ruff format --check .", "python tools/typecheck.py"):
        assert command in ci, f".ci/run does not run {command}"


def test_readme_ci_and_make_run_the_same_test_command():
    """The README's test command (the end of its install line), `.ci/run` and `make test` all
    run the suite in two processes, with the pinned pytest-xdist that `-n` needs."""
    readme = re.findall(r"&& (pytest[^\n`]*)\n", (ROOT / "README.md").read_text())
    ci = re.findall(r"^(pytest[^\n]*)$", (ROOT / ".ci" / "run").read_text(), flags=re.M)
    make = re.findall(r"^\t\$\(BIN\)/(pytest[^\n]*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert readme and ci and make, (readme, ci, make)
    assert {*readme, *ci, *make} == {"pytest -q -n 2"}, (readme, ci, make)
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(canonical(d).startswith("pytest-xdist") for d in dev["dev"])
    assert "pytest-xdist" in constraints() and "execnet" in constraints()
