"""Layering rules (docs/architecture.md §2.2), checked on the source (with ast, so imports
inside functions count too) and in a fresh interpreter (what a torch-free import really
loads)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SERVICE = {"fastapi", "starlette", "sqlalchemy", "alembic", "celery", "kombu", "minio"}
TORCH = {"torch", "torchvision", "diffusers", "timm", "open_clip", "transformers"}
# Layers are the repository's folders; a module's layer is its folder (`digin` for the CLI).
CORE_FORBIDDEN = SERVICE | {"api", "service", "worker", "digin"}
API_FORBIDDEN = TORCH | {"worker"}
SERVICE_FORBIDDEN = TORCH | {"fastapi", "starlette", "api", "worker", "digin"}
WORKER_FORBIDDEN = {"fastapi", "starlette", "api", "digin"}
# The core modules the API and the service layer may import: each loads without torch.
TORCH_FREE = [
    "digin.core",
    "digin.core.config",
    "digin.core.params",
    "digin.core.registry",
    "digin.core.classes",
    "digin.core.imagefiles",
    "digin.core.limits",
    "digin.core.audit_params",
]


def package_dirs() -> dict[str, str]:
    """Repository folder -> installed package (pyproject's package-dir), plus digin/ itself."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {"digin": "digin", **{folder: name for name, folder in config["package-dir"].items()}}


FOLDERS = package_dirs()  # {"core": "digin.core", ..., "digin": "digin"}


def _module_name(path: Path) -> str:
    """The installed name of a file under one of the mapped folders."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = FOLDERS.get(parts[0], parts[0])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """`digin.core.x` -> core, `digin.cli` -> digin, a third-party `torch.nn` -> torch."""
    parts = module.split(".")
    if parts[0] != "digin":
        return parts[0]
    for folder, name in FOLDERS.items():
        if folder != "digin" and (module == name or module.startswith(name + ".")):
            return folder
    return "digin"


def imports(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """Every module ``path`` imports, with its line: import statements anywhere in the file,
    relative imports resolved, and ``importlib.import_module`` / ``__import__`` of a literal."""
    if source is None:
        source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func, arg = node.func, node.args[0]
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"import_module", "__import__"} and isinstance(arg, ast.Constant):
                found.append((str(arg.value), node.lineno))
    return found


def violations(folder: str, forbidden: set[str]) -> list[str]:
    found = {
        (path.relative_to(ROOT), line): module
        for path in sorted((ROOT / folder).rglob("*.py"))
        for module, line in imports(path)
        if layer(module) in forbidden
    }
    return [f"{path}:{line} imports {module}" for (path, line), module in found.items()]


def test_core_imports_no_service_code():
    assert violations("core", CORE_FORBIDDEN) == []


def test_api_imports_no_torch_and_no_worker():
    assert violations("api", API_FORBIDDEN) == []


def test_service_layer_imports_no_http_no_torch_and_no_adapters():
    assert violations("service", SERVICE_FORBIDDEN) == []


def test_worker_imports_the_service_layer_not_the_http_api():
    assert violations("worker", WORKER_FORBIDDEN) == []


@pytest.mark.parametrize("folder", ["api", "service"])
def test_torch_free_layers_import_only_torch_free_core_modules(folder):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module} (torch-free core modules: {TORCH_FREE})"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for module, line in imports(path)
        if layer(module) == "core" and ".".join(module.split(".")[:3]) not in TORCH_FREE
    ]
    assert bad == []


def test_pyproject_lists_every_package_folder():
    """The package mapping installs what is listed: a new folder with an __init__.py must be
    listed too, or an installed (non-editable) copy lacks it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        _module_name(init.parent / "__init__.py")
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert folders == set(config["packages"])


def test_import_checker_sees_lazy_relative_and_dynamic_imports():
    source = (
        "import importlib\n"
        "def f():\n"
        "    import celery.app\n"
        "    from ..registry import x\n"
        "    from . import sibling\n"
        "    importlib.import_module('minio')\n"
    )
    found = {module for module, _ in imports(ROOT / "core" / "sub" / "mod.py", source)}
    assert {"celery.app", "digin.core.registry", "digin.core.sub.sibling", "minio"} <= found


def _exists(module: str) -> bool:
    folder = layer(module)
    base = ROOT.joinpath(folder, *module.split(".")[1 if folder == "digin" else 2 :])
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


@pytest.mark.parametrize("module", [*TORCH_FREE, "digin.cli"])
def test_module_loads_without_torch(module):
    if not _exists(module):
        pytest.skip(f"{module} is not written yet")
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"importing {module} loads torch"


PACKAGES = tuple(FOLDERS)


def _project_modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (anywhere in the file: lazy imports count, and
    `from pkg import sub` imports both pkg and pkg.sub)."""
    modules = _project_modules()
    return {
        name: {m for m, _ in imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_project_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def private_imports() -> list[str]:
    """`from module import _name` of another module's private name; a private submodule may be
    imported by the modules of its own package."""
    modules = _project_modules()
    bad = []
    for name, path in modules.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module.split(".")[0] != "digin":
                continue
            for alias in node.names:
                if not alias.name.startswith("_") or alias.name.startswith("__"):
                    continue
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules and node.module == own_package:
                    continue  # a private module of the importer's own package
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {submodule}")
    return bad


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []


def test_the_project_loads_only_under_its_namespace():
    """Importing every layer (from the repository root, as tests and scripts do) loads no
    top-level `core`, `api`, `service` or `worker` module: a second copy under the old names
    would hold its own module state."""
    code = (
        "import sys, digin.cli, digin.api.app, digin.worker.tasks, digin.service.repo, "
        "digin.core.kinds; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'core', 'api', 'service', 'worker'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_an_uninstalled_checkout_gives_the_same_names(tmp_path):
    """Without the install (no site-packages, the checkout on the path), `digin.core` is core/
    and `digin.service` is service/ all the same."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import digin.core, digin.service; "
        "print(digin.core.__file__); print(digin.service.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [
        str(ROOT / "core" / "__init__.py"),
        str(ROOT / "service" / "__init__.py"),
    ]
