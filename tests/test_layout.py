"""Layering rules of DESIGN §2, checked on the source (with ast, so imports inside functions
count too) and in a fresh interpreter (what a torch-free import really loads)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SERVICE = {"fastapi", "starlette", "sqlalchemy", "alembic", "celery", "kombu", "minio"}
CORE_FORBIDDEN = SERVICE | {"api", "worker"}
API_FORBIDDEN = {"torch", "torchvision", "diffusers", "timm", "open_clip", "transformers"}
# The core modules the API may import: each must load without torch (checked below).
TORCH_FREE = ["core", "core.config", "core.params", "core.registry", "core.classes"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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
        (path.relative_to(ROOT), line): module.split(".")[0]
        for path in sorted((ROOT / folder).rglob("*.py"))
        for module, line in imports(path)
        if module.split(".")[0] in forbidden
    }
    return [f"{path}:{line} imports {module}" for (path, line), module in found.items()]


def test_core_imports_no_service_code():
    assert violations("core", CORE_FORBIDDEN) == []


def test_api_imports_no_torch():
    assert violations("api", API_FORBIDDEN) == []


def test_api_imports_only_torch_free_core_modules():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module} (torch-free core modules: {TORCH_FREE})"
        for path in sorted((ROOT / "api").rglob("*.py"))
        for module, line in imports(path)
        if module.split(".")[0] == "core" and ".".join(module.split(".")[:2]) not in TORCH_FREE
    ]
    assert bad == []


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
    assert {"celery.app", "core.registry", "core.sub.sibling", "minio"} <= found


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
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
