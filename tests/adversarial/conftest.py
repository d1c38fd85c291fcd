"""The adversarial suite's instance (started once for the package) and its tally.

`instance`: see `tests/adversarial/instance.py`. Its fixtures, made before any probe runs:

- tenant A (`adv-alpha`): an uploaded image; a job that a real worker ran to `succeeded` (S3
  artifacts, a webhook delivery); a queued job; a job it canceled itself (a delivery); a batch
  of queued items with a webhook; enough jobs for a next-page cursor;
- tenant B (`adv-beta`): a queued job of its own (its lists are not trivially empty).

The worker runs only until A's job has succeeded: afterwards every submission stays queued.

At the end, the counts per probe class go to `<pytest tmp>/adversarial/adversarial.json`, and
also to the file named by DIGIN_TEST_ADVERSARIAL_JSON when set (the table in RELIABILITY.md
comes from `DIGIN_TEST_ADVERSARIAL_JSON=bench/results/adversarial.json pytest -q
tests/adversarial`); the table is printed in the terminal summary (under `pytest -n 2` by the
controlling process). A plain `pytest -q` writes nothing into the repository.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adversarial.instance import (
    AUTH_FAILURE_RATE,
    JOB_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_ITEMS_PER_BATCH,
    PUBLIC_HOOK,
    ROOT,
    Instance,
    ProbeClass,
    Tally,
    png,
)
from tests.api.conftest import _no_digin_environment, postgresql_url  # noqa: F401 - fixtures
from tests.conftest import worker_redis_url
from tests.e2e.conftest import Worker, flushed_redis, s3_endpoint  # noqa: F401 - fixtures
from tests.reliability.stack import free_port, wait_until

REDIS_URL = worker_redis_url(
    os.environ.get("DIGIN_TEST_REDIS_ADVERSARIAL_URL", "redis://127.0.0.1:6379/14")
)
RESULTS_ENV = "DIGIN_TEST_ADVERSARIAL_JSON"
RESULTS_PATH = os.environ.get(RESULTS_ENV)  # read at import: tests clear DIGIN_* variables
TALLY = Tally(
    [
        ProbeClass(
            "1",
            "Cross-tenant access",
            "tenant B's key and dashboard session on tenant A's job, batch and image ids: reads, "
            "artifact lists and downloads, cancel, results index (JSON lines, CSV), webhook "
            "deliveries, list filters (batch_id, status, kind), A's next-page cursors, dashboard "
            "pages, rows, live polls, artifacts, thumbnails and cancel forms",
            "404 (a 404 page on the dashboard), or none of A's ids in B's lists; A's rows and "
            "deliveries unchanged: every query is scoped to the caller's tenant, and a 404 rather "
            "than a 403 does not even confirm that the id exists",
        ),
        ProbeClass(
            "2",
            "Unauthenticated",
            "every operation of the OpenAPI document that declares the bearer scheme, and every "
            "dashboard route, with no key, malformed keys, unknown well-formed keys and revoked "
            "keys, with bodies that would resolve a webhook host, are invalid, or are unstorable",
            "401 problem with WWW-Authenticate (not 422, not 500; the dashboard: a redirect to "
            "its login, or 401 for its polls), no DNS lookup and nothing written: the key is "
            "checked before the body is validated",
        ),
        ProbeClass(
            "2b",
            "Unauthenticated, body not parseable",
            "the bodies of POST /v1/jobs, /v1/batches (not JSON, truncated JSON, invalid UTF-8) "
            "and /v1/images (multipart without a boundary) with each kind of missing or bad key",
            "401, as for every other body: who may not call a route should learn nothing about "
            "how it parses bodies",
        ),
        ProbeClass(
            "3",
            "Brute force",
            "wrong secrets for a known key prefix, from one address and from rotating addresses "
            "(REST and the dashboard's login form), with "
            f"DIGIN_AUTH_FAILURE_RATE={AUTH_FAILURE_RATE}",
            "401 up to the rate, then 429 with Retry-After before the key is checked, also for "
            "the right key from that address or with that prefix (the counters are per address "
            "and per prefix); a client-chosen X-Forwarded-For entry does not reset them; another "
            "tenant's right key from another address still works",
        ),
        ProbeClass(
            "4",
            "Poisoned values",
            "NUL, lone surrogates (JSON escapes) and NaN/±Infinity/1e999 in every string, key "
            "and number of job and batch bodies (params, axes, items, metadata, webhook), and a "
            "NUL in Idempotency-Key; meanwhile the other tenant submits valid jobs",
            "422 naming the field (PostgreSQL cannot store them; JSON has no such numbers), or "
            "400 from the HTTP parser for a NUL in a header; every valid submission of the other "
            "tenant 202 (none 500), and nothing written for the refused ones",
        ),
        ProbeClass(
            "5",
            "Model specs reaching server paths",
            "with DIGIN_MODEL_ALLOW_LIST=*: specs naming /etc, /etc/passwd, missing paths, '..' "
            "escapes and symbolic links out of the model root, in every model field of jobs and "
            "batches (classifier, diffusion, classifier1/2, classifiers axis, pairs, items), with "
            "class names guessed from a model card outside the root",
            "422 with one refusal text for every spec, the same for existing and missing paths, "
            "nothing read from there in the answer: the allow-list is not a path check, the model "
            "roots are",
        ),
        ProbeClass(
            "6",
            "Webhook URLs",
            "loopback, private, shared, link-local, unique-local, multicast, unspecified and "
            "reserved targets in every encoding (IPv4-mapped, -compatible, 6to4, NAT64, Teredo, "
            "decimal, hex, octal and short IPv4, full-width digits, zone ids), localhost and "
            "local names, credentials, other schemes, CR/LF and control characters, on jobs "
            "and batches",
            "422 naming webhook.url, and no DNS lookup for any of them: the host is judged by "
            "what it means before anything is resolved (server-side request forgery)",
        ),
        ProbeClass(
            "7",
            "Oversized or costly jobs",
            "resolution (over 2048, and over the diffusion model's own bound), images per class, "
            "classes, neurons, targets, iterations, DDIM and loss steps, cutouts, PCA components "
            "over their bounds; jobs within every bound but over DIGIN_MAX_JOB_COST; batches over "
            "DIGIN_MAX_ITEMS_PER_BATCH, axes and seeds over theirs; a body over "
            "DIGIN_MAX_BODY_BYTES",
            "422 naming the field and its limit (the cap and the estimate for the cost; 413 for "
            "the body), nothing queued: a worker is never handed a job it cannot finish",
        ),
        ProbeClass(
            "8",
            "Dashboard",
            "cancel, login and logout forms without or with a wrong CSRF token, a copied session "
            "cookie after logout, `next` pointing at other sites, tampered and forged session "
            "cookies",
            "403 for the forms (nothing changed, no session made or ended); the copied cookie and "
            "every tampered cookie sent to the login; `next` kept on /ui/",
        ),
        ProbeClass(
            "9",
            "Another tenant's uploaded images",
            "tenant B's jobs and batches naming tenant A's uploaded image id (`image_id`, "
            "`images.image_ids`, `spurious.image_ids`)",
            "4xx at the API: ids are resolved per tenant, and a job must not be accepted with an "
            "image it cannot use",
        ),
        ProbeClass(
            "10",
            "Memory",
            "thousands of distinct refused requests (unknown keys, unstorable values, model "
            "specs, webhook hosts, other tenants' ids)",
            "the API process's resident memory stays flat (within a tolerance): nothing a "
            "refused request brings is kept",
        ),
    ]
)


@pytest.fixture(scope="package")
def tally() -> Tally:
    return TALLY


@pytest.fixture(scope="package")
def adversarial_redis() -> Iterator[str]:
    yield from flushed_redis(REDIS_URL)


def model_layout(folder: Path) -> dict[str, Path]:
    """A model root holding a copy of the digits zoo; outside it a folder with a zoo card of
    secret class names and a file; a symbolic link from the root to that folder and one to
    /etc."""
    from digin.core.registry import ZOO_DIR

    root, secret = folder / "models", folder / "secret"
    root.mkdir(parents=True)
    shutil.copytree(ZOO_DIR, root / "zoo")
    secret.mkdir()
    card = json.loads((ZOO_DIR / "cnn.json").read_text())
    names = ["launch-code", "api-token", "zz-private"]
    (secret / "cnn.json").write_text(json.dumps(card | {"class_names": names}))
    (secret / "w.safetensors").write_bytes(b"not weights")
    (root / "escape").symlink_to(secret, target_is_directory=True)
    (root / "etc").symlink_to("/etc", target_is_directory=True)
    return {"root": root, "secret": secret, "folder": folder}


def start_worker(instance: Instance) -> Worker:
    log = instance.folder / "worker.log"
    argv = [sys.executable, "-m", "celery", "-A", "digin.worker.app:app", "worker",
            "--queues=interactive", "--concurrency=1", "--pool=prefork", "--loglevel=INFO",
            "--without-gossip", "--without-mingle",
            f"--hostname=adv-{uuid.uuid4().hex[:6]}@%h"]  # fmt: skip
    env = instance.env() | {"DIGIN_DEVICE": "cpu"}
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    return Worker(proc, log)


def submit(instance: Instance, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
    owner = instance.tenants[tenant]
    response = instance.request("POST", "/v1/jobs", json=body, headers=owner.headers())
    assert response.status_code == 202, response.text
    return dict(response.json())


def guided(iterations: int = 1, **extra: Any) -> dict[str, Any]:
    return {"kind": "guided", "params": {"classes": ["seven"], "guidance":
            {"iterations": iterations}}, **extra}  # fmt: skip


def make_fixtures(instance: Instance, layout: dict[str, Path]) -> None:
    """Tenants A and B and what the probes attack (module docstring); the worker runs only
    until A's first job has succeeded."""
    worker = start_worker(instance)
    try:
        instance.wait_ready()
        a, b = instance.add_tenant("adv-alpha"), instance.add_tenant("adv-beta")
        upload = instance.request("POST", "/v1/images", headers=a.headers(),
                                  files={"file": ("digit.png", png(1), "image/png")})  # fmt: skip
        assert upload.status_code == 201, upload.text
        done = submit(instance, a.name, guided(webhook={"url": PUBLIC_HOOK}))

        def finished() -> dict[str, Any] | None:
            if worker.proc.poll() is not None:
                raise AssertionError(f"the worker exited: {worker.log.read_text()[-3000:]}")
            job = instance.request("GET", f"/v1/jobs/{done['id']}", headers=a.headers()).json()
            return job if job["status"] in ("succeeded", "failed", "canceled") else None

        job = wait_until("tenant A's job to finish", finished, JOB_TIMEOUT_S, 0.25)
        assert job["status"] == "succeeded", job
    finally:
        worker.stop()
    artifacts = instance.request("GET", f"/v1/jobs/{done['id']}/artifacts", headers=a.headers())
    names = [e["name"] for e in artifacts.json()["data"]]
    assert "grid.png" in names and "result.json" in names, names
    queued = submit(instance, a.name, guided())
    canceled = submit(instance, a.name, guided(webhook={"url": PUBLIC_HOOK}))
    response = instance.request("POST", f"/v1/jobs/{canceled['id']}/cancel", headers=a.headers())
    assert response.json()["status"] == "canceled", response.text
    batch_body = {"kind": "guided", "classes": [1, 2, 3], "params_template": {"guidance":
                  {"iterations": 1}}, "webhook": {"url": PUBLIC_HOOK, "events":
                  ["batch.completed", "canceled"]}}  # fmt: skip
    batch = instance.request("POST", "/v1/batches", json=batch_body, headers=a.headers())
    assert batch.status_code == 202, batch.text
    b_job = submit(instance, b.name, guided())
    instance.fixtures.update(
        layout=layout,
        image_id=upload.json()["id"],
        done=done["id"],
        artifacts=names,
        queued=queued["id"],
        canceled=canceled["id"],
        batch=batch.json()["id"],
        b_job=b_job["id"],
    )


@pytest.fixture(scope="package")
def instance(
    postgresql_url: str,  # noqa: F811
    adversarial_redis: str,
    s3_endpoint: str,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Instance]:
    """The production-like instance (module docstring), started once for the package."""
    from digin.service.settings import fresh_settings
    from digin.service.storage import storage_from_settings

    started = time.monotonic()
    folder = tmp_path_factory.mktemp("adversarial")
    layout = model_layout(folder / "layout")
    values: dict[str, Any] = {
        "data_dir": folder / "data",
        "database_url": postgresql_url,
        "broker_url": adversarial_redis,
        "storage_url": f"s3://digin-adv-{uuid.uuid4().hex[:8]}",
        "s3_endpoint": s3_endpoint,
        "s3_access_key": "adversarial-access-key",
        "s3_secret_key": secrets.token_urlsafe(24),
        "s3_region": "us-east-1",
        "auth": "on",
        "secret_key": secrets.token_urlsafe(32),
        "auth_failure_rate": AUTH_FAILURE_RATE,
        "model_allow_list": ["*"],
        "model_roots": [layout["root"]],
        "max_items_per_batch": MAX_ITEMS_PER_BATCH,
        "max_body_bytes": MAX_BODY_BYTES,
    }
    settings = fresh_settings(**values)
    assert settings.mode == "production" and settings.auth_enabled
    storage_from_settings(settings).ensure_bucket()
    instance = Instance(f"http://127.0.0.1:{free_port()}", values, folder)
    instance.start_api()
    try:
        make_fixtures(instance, layout)
        TALLY.instance = {
            "api": "python -m digin api (uvicorn, 1 process, proxy headers from 127.0.0.1)",
            "mode": settings.mode,
            "database": "PostgreSQL (a fresh database, migrated)",
            "broker": "Redis (also the counts of refused keys)",
            "storage": "S3: moto's server, real minio client",
            "settings": {
                "DIGIN_AUTH": "on",
                "DIGIN_SECRET_KEY": "random, 43 characters",
                "DIGIN_AUTH_FAILURE_RATE": AUTH_FAILURE_RATE,
                "DIGIN_MODEL_ALLOW_LIST": "*",
                "DIGIN_MODEL_ROOTS": "one folder (with a copy of the digits zoo)",
                "DIGIN_MAX_ITEMS_PER_BATCH": MAX_ITEMS_PER_BATCH,
                "DIGIN_MAX_BODY_BYTES": MAX_BODY_BYTES,
            },
            "tenants": 2,
            "setup_s": round(time.monotonic() - started, 1),
        }
        yield instance
    finally:
        instance.stop()
        write_results(folder)


def write_results(folder: Path) -> None:
    global RESULTS_WRITTEN
    if not TALLY.ran:
        return
    data = TALLY.as_json()
    paths = [folder / "adversarial.json"]
    if RESULTS_PATH:
        paths.append(Path(RESULTS_PATH) if os.path.isabs(RESULTS_PATH) else ROOT / RESULTS_PATH)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    RESULTS_WRITTEN = [str(p) for p in paths]


RESULTS_WRITTEN: list[str] = []


def summary_lines() -> list[str]:
    return [TALLY.table(), *(f"counts written to {path}" for path in RESULTS_WRITTEN)]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TALLY.ran:
        return
    terminalreporter.section("adversarial probes")
    for line in summary_lines():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In an xdist worker (`pytest -n 2`), whose terminal nobody sees, the table goes to the
    controller, which prints it (`tests/conftest.py`)."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None and TALLY.ran:
        output.setdefault("summary_sections", []).append(["adversarial probes", summary_lines()])
