"""The client as its own distribution (`client/`, `pip install ./client`): it declares only
httpx and pydantic, imports nothing else outside the standard library, builds a wheel of just
`digin_client` (typed), and works in an interpreter where the server's packages are absent."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.worker.helpers import ROOT

CLIENT = ROOT / "client"
ALLOWED = {"httpx", "pydantic", "digin_client"}
# What the client must neither import nor need: the server's packages and the libraries only
# the server (or the command line) uses.
SERVER = {
    "digin", "api", "core", "service", "worker", "torch", "torchvision", "diffusers",
    "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "celery", "kombu",
    "redis", "minio", "typer", "numpy", "PIL",
}  # fmt: skip


def test_it_declares_only_httpx_and_pydantic():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "digin-client" and project["version"] == "0.1.0"
    names = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert names == {"httpx", "pydantic"}
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "digin-client==0.1.0" in main["project"]["dependencies"]


def test_its_modules_import_only_the_standard_library_httpx_and_pydantic():
    found = {}
    for path in sorted((CLIENT / "digin_client").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: a relative import"
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ALLOWED:
                    found[f"{path.relative_to(ROOT)}:{node.lineno}"] = name
    assert found == {}


def test_the_wheel_holds_the_typed_package_alone(tmp_path: Path):
    source = tmp_path / "client"  # a copy: the build writes next to its sources
    skip = shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    shutil.copytree(CLIENT, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("digin_client-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read("digin_client-0.1.0.dist-info/METADATA").decode()
    packages = {n.split("/")[0] for n in names if not n.startswith("digin_client-0.1.0.dist-info")}
    assert packages == {"digin_client"}
    assert "digin_client/py.typed" in names and "digin_client/_ops.py" in names
    requires = sorted(line for line in metadata.splitlines() if line.startswith("Requires-Dist"))
    assert requires == ["Requires-Dist: httpx>=0.27", "Requires-Dist: pydantic>=2.7"]


# Run by a fresh, isolated interpreter (no current folder on sys.path): the server's packages
# are made absent, the client is imported from client/ and used against an httpx mock server.
ISOLATED = """
import asyncio, json, sys
from importlib.abc import MetaPathFinder

CLIENT, SERVER = sys.argv[1], set(json.loads(sys.argv[2]))
attempts = []


class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in SERVER:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())
sys.path.insert(0, CLIENT)

import httpx
import digin_client
from digin_client import AsyncClient, Client, NotFoundError

JOB = {"id": "j1", "kind": "guided", "status": "queued", "params": {}, "seed": 0,
       "priority": 5, "created_at": "2025-01-01T00:00:00Z"}


def answer(request):
    if request.url.path == "/v1/jobs/j1":
        return httpx.Response(200, json=JOB)
    if request.url.path == "/v1/jobs":
        return httpx.Response(200, json={"data": [JOB], "next_cursor": None})
    problem = {"type": "urn:digin:problem:not-found", "title": "Not Found", "status": 404}
    return httpx.Response(404, json=problem)


with Client("http://digin.test", transport=httpx.MockTransport(answer)) as client:
    assert client.get("j1").id == "j1"
    assert [job.id for job in client.list()] == ["j1"]
    try:
        client.get("j2")
    except NotFoundError as exc:
        assert exc.status == 404
    else:
        raise AssertionError("no NotFoundError")


async def main():
    async with AsyncClient("http://digin.test", transport=httpx.MockTransport(answer)) as client:
        assert (await client.get("j1")).status == "queued"
        assert [job.id async for job in client.list()] == ["j1"]


asyncio.run(main())
loaded = sorted({name.partition(".")[0] for name in sys.modules} & SERVER)
print(json.dumps({"file": digin_client.__file__, "attempts": attempts, "loaded": loaded}))
"""


@pytest.mark.parametrize("blocked", [True, False], ids=["server-absent", "server-installed"])
def test_it_imports_and_works_without_the_server(tmp_path: Path, blocked: bool):
    """With the server's packages absent (a finder that refuses them), the client imports and
    runs sync and async; with them installed, it still loads none of them."""
    script = tmp_path / "isolated.py"
    script.write_text(ISOLATED)
    refused = sorted(SERVER) if blocked else []
    out = subprocess.run(
        [sys.executable, "-I", str(script), str(CLIENT), json.dumps(refused)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert Path(report["file"]).is_relative_to(CLIENT / "digin_client")
    assert report["attempts"] == [] and report["loaded"] == []
