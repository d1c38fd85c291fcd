"""The deployment files (docs/architecture.md §13), checked without a Docker engine:
`docker-compose.yml` and `docker-compose.cpu.yml` against the official compose-spec JSON schema
(the copy that the check-jsonschema package ships) before and after variable interpolation, then
what the schema cannot see (healthchecks behind `service_healthy`, secrets without defaults,
`digin` commands and their options, setting names, GPU reservations); `Dockerfile` and
`Dockerfile.gpu` parsed with dockerfile-parse (base images, the pinned torch, entry points, what
is copied in)."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from dockerfile_parse import DockerfileParser

from digin.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "DIGIN_S3_ACCESS_KEY", "DIGIN_S3_SECRET_KEY",
           "DIGIN_SECRET_KEY")  # fmt: skip
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.IGNORECASE)
ENV = {name: f"test-{name.lower()}-value-of-32-characters-at-least" for name in SECRETS}
OUR_IMAGES = re.compile(r"digin-")
# Variables the containers read besides the DIGIN_* settings.
OTHER_CONTAINER_ENV = {"HF_HOME", "TORCH_HOME", "OMP_NUM_THREADS", "REDIS_PASSWORD"}


# --- compose's YAML tags and interpolation -------------------------------------------------------
class Reset:
    """`!reset value`: the override removes the base file's value (compose 2.24+)."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Override:
    """`!override value`: the override replaces the base value instead of merging it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tag(cls: type) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))  # type: ignore[arg-type]

    return construct


ComposeLoader.add_constructor("!reset", _tag(Reset))
ComposeLoader.add_constructor("!override", _tag(Override))


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass


class MissingVariable(Exception):
    pass


_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate_string(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alt}, $VAR."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or value == ""
        if op == ":-":
            return arg if unset_or_empty else value  # type: ignore[return-value]
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise MissingVariable(f"{name}: {arg}")
            return value  # type: ignore[return-value]
        if op == ":+":
            return "" if unset_or_empty else arg
        return value or ""

    return _VAR.sub(replace, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_string(node, env)
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, Reset | Override):
        return type(node)(interpolate(node.value, env))
    return node


def strip_tags(node: Any) -> Any:
    """The file as the schema sees it (the tags' values in place)."""
    if isinstance(node, dict):
        return {k: strip_tags(v) for k, v in node.items()}
    if isinstance(node, list):
        return [strip_tags(v) for v in node]
    if isinstance(node, Reset | Override):
        return strip_tags(node.value)
    return node


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, as far as these files use it: mappings merge
    key by key, `!reset` removes, `!override` and other values replace."""
    if isinstance(override, Reset):
        return None
    if isinstance(override, Override):
        return strip_tags(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            merged = merge(base.get(key), value)
            if merged is None and isinstance(value, Reset):
                out.pop(key, None)
            else:
                out[key] = merged
        return out
    return strip_tags(override)


def drop_extensions(project: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in project.items() if not k.startswith("x-")}


@cache
def schema() -> dict[str, Any]:
    text = (
        resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    ).read_text()
    return json.loads(text)


def validate(document: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def project(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The interpolated, merged project of `files` (as `docker compose -f … config` would)."""
    merged: Any = {}
    for path in files:
        merged = merge(merged, interpolate(load(path), ENV if env is None else env))
    return merged


# --- the compose files --------------------------------------------------------------------------
@pytest.mark.parametrize("path", [COMPOSE, CPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_spec(path: Path):
    raw = load(path)
    validate(strip_tags(raw))
    validate(strip_tags(interpolate(raw, ENV)))


def test_the_merged_cpu_project_follows_the_compose_spec():
    validate(project(COMPOSE, CPU_OVERRIDE))


def test_the_schema_check_catches_a_bad_file():
    bad = project(COMPOSE)
    bad["services"]["api"]["depends_on"]["postgres"]["condition"] = "service_ready"
    with pytest.raises(AssertionError, match="depends_on"):
        validate(bad)


@pytest.mark.parametrize("missing", SECRETS)
def test_every_secret_is_required_from_the_environment(missing: str):
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(MissingVariable, match=f"^{missing}: set {missing}"):
        project(COMPOSE, env=env)
    with pytest.raises(MissingVariable, match=missing):
        project(COMPOSE, env=env | {missing: ""})  # empty counts as missing (':?')


def test_no_secret_has_a_default_or_a_literal_value():
    text = COMPOSE.read_text() + CPU_OVERRIDE.read_text()
    for match in _VAR.finditer(text):
        name = match.group("name") or match.group("bare")
        if name and SECRET_NAME.search(name):
            assert match.group("op") == ":?", f"{match.group(0)}: a secret needs ${{{name}:?…}}"
    for services in (load(COMPOSE)["services"], load(CPU_OVERRIDE)["services"]):
        for name, service in services.items():
            for key, value in environment(strip_tags(service)).items():
                if SECRET_NAME.search(key):
                    assert re.search(r"\$\{[A-Z0-9_]+:\?", str(value)), f"{name}.{key}={value}"
    # the connection URLs carry the passwords from the environment only
    env = load(COMPOSE)["x-digin-env"]
    for key in ("DIGIN_DATABASE_URL", "DIGIN_BROKER_URL"):
        assert re.search(r":\$\{[A-Z_]+PASSWORD:\?[^}]+\}@", env[key]), key


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu", "cpu"])
def test_dependencies_are_healthchecked_and_exist(files: tuple[Path, ...]):
    services = project(*files)["services"]
    for name, service in services.items():
        for target, rule in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule.get("condition") == "service_healthy":
                check = services[target].get("healthcheck")
                assert check and not check.get("disable") and check.get("test"), (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
                )
    # the order that matters: servers → API (migrates) → workers and reaper
    api = services["api"]["depends_on"]
    assert {k for k, v in api.items() if v["condition"] == "service_healthy"} == {
        "postgres", "redis", "minio"}  # fmt: skip
    for name in ("worker", "reaper"):
        assert services[name]["depends_on"]["api"]["condition"] == "service_healthy"


@cache
def digin_cli() -> Any:
    """The `digin` command group (typer's own click)."""
    from digin.cli import app

    return typer.main.get_command(app)


def check_digin_command(argv: list[str]) -> str:
    """Parse `digin <argv>` with the real command line (unknown commands or options raise);
    returns the subcommand."""
    group = digin_cli()
    name, *args = argv
    with group.context_class(group, info_name="digin") as ctx:
        command = group.get_command(ctx, name)
        assert command is not None, f"`digin {name}` is not a digin command"
        while hasattr(command, "get_command"):  # a group: `keys create …`
            sub, *args = args
            command = command.get_command(ctx, sub)
            assert command is not None, f"`digin {name} {sub}` is not a digin command"
        command.make_context(name, list(args))
    return name


def digin_invocations(service: dict[str, Any]) -> list[list[str]]:
    """The `digin …` argument lists a service runs: its command under the `digin` entry point
    of our images, and every `digin …` of a `sh -c` script."""
    command = service.get("command")
    if command is None:
        return []
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"]:
        found = []
        for part in re.split(r"&&|;|\|\|", argv[2]):
            words = shlex.split(part)
            if words and words[0] == "exec":
                words = words[1:]
            if words and words[0] == "digin":
                found.append(words[1:])
        return found
    return [argv]


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["gpu", "cpu"])
def test_commands_are_digin_commands_with_valid_options(files: tuple[Path, ...]):
    services = project(*files)["services"]
    ran = set()
    for name, service in services.items():
        if not OUR_IMAGES.search(str(service.get("image", ""))):
            continue
        invocations = digin_invocations(service)
        assert invocations, f"{name} runs no digin command"
        ran |= {check_digin_command(argv) for argv in invocations}
    assert ran == {"migrate", "api", "worker", "reaper"}
    api = digin_invocations(services["api"])
    assert [argv[0] for argv in api] == ["migrate", "api"]  # migrations before the API starts


def test_the_command_check_catches_unknown_commands_and_options():
    with pytest.raises(AssertionError, match="not a digin command"):
        check_digin_command(["wroker"])
    with pytest.raises(Exception, match="No such option: --queue-name"):
        check_digin_command(["worker", "--queue-name", "x"])


def test_environment_names_are_real_settings():
    settings = {f"DIGIN_{name.upper()}" for name in Settings.model_fields}
    for files in ((COMPOSE,), (COMPOSE, CPU_OVERRIDE)):
        for name, service in project(*files)["services"].items():
            if not OUR_IMAGES.search(str(service.get("image", ""))):
                continue
            for key in environment(service):
                if key.startswith("DIGIN_"):
                    assert key in settings, f"{name}: {key} is not a setting of service/settings.py"
                else:
                    assert key in OTHER_CONTAINER_ENV, f"{name}: unexpected variable {key}"


def test_the_settings_of_the_deployment_are_valid_production_settings(
    monkeypatch: pytest.MonkeyPatch,
):
    """The API's environment, as compose hands it over, is accepted by service/settings.py."""
    for name in list(os.environ):
        if name.startswith("DIGIN_"):
            monkeypatch.delenv(name)
    service = project(COMPOSE)["services"]["api"]
    for key, value in environment(service).items():
        if value not in (None, ""):
            monkeypatch.setenv(key, str(value))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.mode == "production" and settings.auth_enabled
    assert settings.database_url.startswith("postgresql+psycopg://digin:")
    assert settings.broker_url.startswith(f"redis://:{ENV['REDIS_PASSWORD']}@redis:6379/")
    assert settings.secret_key is not None  # the dashboard can sign sessions
    assert settings.storage_backend == "s3" and settings.s3_endpoint == "http://minio:9000"


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


def test_one_worker_per_gpu_with_the_nvidia_runtime_and_a_weights_cache():
    compose = project(COMPOSE)
    services = compose["services"]
    workers = {n: s for n, s in services.items() if "Dockerfile.gpu" in str(s.get("build"))}
    assert {"worker", "worker-gpu1"} <= set(workers)
    gpus = []
    for name, worker in workers.items():
        (device,) = gpu_devices(worker)
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: replicas with a count all get the same GPU"
        gpus += device["device_ids"]
        assert worker["deploy"]["replicas"] == 1, f"{name}: one process per GPU"
        argv = digin_invocations(worker)[0]
        assert argv[0] == "worker" and argv[argv.index("--concurrency") + 1] == "1"
        env = environment(worker)
        assert env["DIGIN_DEVICE"] == "cuda"
        (mount,) = worker["volumes"]
        volume, path = mount.split(":")[:2]
        assert volume in compose["volumes"]
        assert env["HF_HOME"].startswith(path + "/") and env["TORCH_HOME"].startswith(path + "/")
    assert len(gpus) == len(set(gpus)), f"two workers share a GPU: {gpus}"
    assert services["worker-gpu1"]["profiles"] == ["gpu1"]  # only on hosts with a second GPU


def test_the_cpu_override_removes_every_gpu_reservation():
    services = project(COMPOSE, CPU_OVERRIDE)["services"]
    for name, service in services.items():
        assert not gpu_devices(service), f"{name} still reserves a GPU"
        assert "Dockerfile.gpu" not in str(service.get("build")), name
    worker = services["worker"]
    build = worker["build"]
    assert (build["target"], build["dockerfile"]) == ("worker-cpu", "Dockerfile")
    assert environment(worker)["DIGIN_DEVICE"] == "cpu"
    assert worker["deploy"]["replicas"] == "2"  # DIGIN_CPU_WORKERS, default 2
    assert environment(worker)["DIGIN_DATABASE_URL"].startswith("postgresql://")  # merged, kept


# --- the Dockerfiles ------------------------------------------------------------------------------
def dockerfile(name: str) -> DockerfileParser:
    parser = DockerfileParser(fileobj=(ROOT / name).open("rb"))
    return parser


def stages(parser: DockerfileParser) -> dict[str, list[dict[str, Any]]]:
    """Instructions per build stage (named by `AS name`, else by their index)."""
    found: dict[str, list[dict[str, Any]]] = {}
    current = None
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            current = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(found))
            found[current] = []
        if current is not None:
            found[current].append(instruction)
    return found


def values(instructions: list[dict[str, Any]], kind: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == kind]


@cache
def torch_pins() -> set[str]:
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {d for d in core["core"] if d.startswith(("torch==", "torchvision=="))}
    assert len(pins) == 2
    return pins


def test_gpu_image_is_cuda_runtime_with_the_pinned_torch():
    parser = dockerfile("Dockerfile.gpu")
    cuda_runtime = r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+"
    assert re.fullmatch(cuda_runtime, parser.baseimage), parser.baseimage
    runs = values(parser.structure, "RUN")
    installs = [i.strip() for run in runs for i in re.findall(r"pip install ([^&;]+)", run)]
    torch_install = [i for i in installs if "torch==" in i]
    assert len(torch_install) == 1
    assert {w for w in torch_install[0].split() if "==" in w} == torch_pins()
    assert "python3.11" in " ".join(runs)
    assert any("'.[core]'" in i for i in installs)
    assert json.loads(values(parser.structure, "ENTRYPOINT")[-1]) == ["digin"]
    check_digin_command(json.loads(values(parser.structure, "CMD")[-1]))
    assert parser.envs["DIGIN_DEVICE"] == "cuda"
    assert values(parser.structure, "USER")[-1] != "root"


def test_cpu_image_stages_api_without_torch_and_worker_with_the_pins():
    parser = dockerfile("Dockerfile")
    found = stages(parser)
    assert {"base", "api", "worker-cpu"} <= set(found)
    assert values(parser.structure, "FROM")[0].startswith("python:3.11-")
    api_runs = " ".join(values(found["api"], "RUN"))
    assert "torch" not in api_runs and "[core]" not in api_runs  # the API image stays small
    worker_runs = " ".join(values(found["worker-cpu"], "RUN"))
    (torch_install,) = re.findall(r"pip install ((?:-c \S+ )?torch==[^&;\\]+)", worker_runs)
    pins = {w for w in torch_install.split() if "==" in w}
    assert pins == torch_pins() and "whl/cpu" in torch_install
    for stage in ("api", "worker-cpu"):
        assert json.loads(values(found[stage], "ENTRYPOINT")[-1]) == ["digin"]
        check_digin_command(json.loads(values(found[stage], "CMD")[-1]))
        assert values(found[stage], "USER")[-1] != "root"
    targets = {
        s["build"]["target"]
        for files in ((COMPOSE,), (COMPOSE, CPU_OVERRIDE))
        for s in project(*files)["services"].values()
        if isinstance(s.get("build"), dict) and s["build"].get("dockerfile") == "Dockerfile"
    }
    assert targets == {"api", "worker-cpu"} and targets <= set(found)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_images_install_every_dependency_from_the_constraints(name: str):
    runs = " ".join(values(dockerfile(name).structure, "RUN"))
    installs = re.findall(r"pip install ([^&;]+)", runs)
    assert installs
    for install in installs:
        assert "-c constraints.txt" in install, install


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_images_copy_every_package_and_the_migrations(name: str):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    packages = folders | {"digin", "client"}
    copied = set()
    for value in values(dockerfile(name).structure, "COPY"):
        sources = value.split()[:-1]
        copied |= {s.rstrip("/") for s in sources}
    needed = packages | {
        "migrations",
        "alembic.ini",
        "pyproject.toml",
        "README.md",
        "constraints.txt",
    }
    assert needed <= copied, needed - copied
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not (needed & ignored), needed & ignored
    assert (ROOT / "migrations" / "env.py").is_file()
