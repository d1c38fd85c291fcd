"""Audits end to end in a production-mode deployment: the HTTP API (TestClient), two Celery
worker subprocesses, PostgreSQL, Redis and S3 (moto + minio). An audit of every class of the
digits zoo's spurious classifier runs as a graph of jobs (class jobs on both workers, the
follow-ups of flagged classes, the report job); GET shows finished class rows while it runs;
the report ranks "seven" (the class whose training planted a patch) first and downloads as
JSON and as one self-contained HTML page. A second audit canceled mid-way writes no report and
keeps its finished classes readable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select

from digin.service import repo
from digin.service.db import Job
from digin.service.db.models import Audit
from tests.e2e.conftest import Service, make_service, wait_until

AUDIT_TIMEOUT_S = 600.0
# small but real: 30 test images per class, two guidance iterations, one image per component
BODY = {
    "classifier": "digits:cnn-spurious",
    "classes": "all",
    "images": {"digits": "test", "per_class": 30},
    "guidance": {"iterations": 2},
    "budget": {"images_per_component": 1},
    "seed": 0,
}


@pytest.fixture(scope="module")
def service(
    postgresql_url: str, redis_url: str, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The conftest's deployment, with two workers; audit rows (which refer to batches and
    jobs) are deleted before the deployment empties its tables."""
    service = make_service(postgresql_url, redis_url, s3_endpoint, tmp_path_factory.mktemp("au"))
    try:
        service.start_worker()
        service.start_worker()
        yield service
    finally:
        for worker in service.workers:
            worker.stop()
        with service.sessions.begin() as session:
            session.execute(delete(Audit))
        service.close()


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from digin.api.app import create_app

    with TestClient(create_app(service.settings)) as client:
        yield client


def api_key(service: Service, tenant: str) -> dict[str, str]:
    with service.sessions() as session:
        _, secret = repo.create_api_key(session, tenant_name=tenant)
        session.commit()
    return {"Authorization": f"Bearer {secret}"}


def download(client: Any, url: str, auth: dict[str, str]) -> bytes:
    """A report download: S3 answers with a redirect to a presigned URL, fetched as a client."""
    response = client.get(url, headers=auth, follow_redirects=False)
    assert response.status_code == 307, response.text
    return httpx.get(response.headers["location"], timeout=30).raise_for_status().content


def test_digits_audit_ranks_seven_first_and_reports_as_json_and_html(
    service: Service, client: Any, tmp_path: Path
):
    auth = api_key(service, "e2e-audit")
    created = client.post("/v1/audits", json=BODY, headers=auth)
    assert created.status_code == 202, created.text
    location = created.headers["Location"]
    partial: list[dict[str, Any]] = []

    def finished() -> dict[str, Any] | None:
        audit = client.get(location, headers=auth).json()
        if audit["status"] == "running" and any(c["row"] for c in audit["classes"]):
            partial.append(audit)
        return audit if audit["status"] != "running" else None

    audit = wait_until("the audit to finish", finished, AUDIT_TIMEOUT_S, 0.5)
    assert audit["status"] == "succeeded", (audit, worker_logs(service))
    assert audit["class_counts"]["succeeded"] == 10 and audit["progress"] == 1.0
    assert partial, "finished class rows are shown while the audit runs"
    assert "seven" in audit["flagged"]
    # the graph ran on the engine: class jobs on both workers, follow-ups for flagged classes
    with service.sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.batch_id == audit["id"])))
    kinds = [j.kind for j in sorted(jobs, key=lambda j: j.item_index or 0)]
    assert kinds[:10] == ["audit_class"] * 10 and kinds[-1] == "audit_report"
    assert "pca_component" in kinds[10:-1]
    assert len({(j.worker or {}).get("pid") for j in jobs if j.kind == "audit_class"}) == 2

    report = json.loads(download(client, f"{location}/report", auth))
    ranked = [row["class_name"] for row in report["classes"]]
    assert ranked[0] == "seven" and sorted(ranked) == sorted(c["name"] for c in audit["classes"])
    seven = report["classes"][0]
    assert seven["flagged"] and seven["auc"] < BODY_THRESHOLD
    assert any(c["visualizations"] for c in seven["components"] if c["flagged"])
    page = download(client, f"{location}/report?format=html", auth).decode()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "(not included)" not in page  # every image the report names is inline
    (tmp_path / "report.html").write_text(page)


BODY_THRESHOLD = 0.75  # the audit's default AUC threshold


def test_a_canceled_audit_writes_no_report_and_keeps_finished_classes(
    service: Service, client: Any
):
    auth = api_key(service, "e2e-audit-cancel")
    created = client.post("/v1/audits", json=BODY, headers=auth)
    assert created.status_code == 202, created.text
    location = created.headers["Location"]

    def one_class_done() -> bool:
        return client.get(location, headers=auth).json()["class_counts"]["succeeded"] > 0

    wait_until("a class to finish", one_class_done, AUDIT_TIMEOUT_S, 0.2)
    assert client.post(f"{location}/cancel", headers=auth).status_code == 200

    def ended() -> dict[str, Any] | None:
        audit = client.get(location, headers=auth).json()
        return audit if audit["status"] != "running" else None

    audit = wait_until("the audit to stop", ended, AUDIT_TIMEOUT_S, 0.2)
    assert audit["status"] == "canceled" and audit["report_job_id"] is None
    assert audit["class_counts"]["canceled"] > 0
    done = [c for c in audit["classes"] if c["status"] == "succeeded"]
    assert done and all(c["row"] is not None for c in done)
    assert client.get(f"{location}/report", headers=auth).status_code == 409


def worker_logs(service: Service) -> str:
    return "\n".join(w.log.read_text(errors="replace")[-3000:] for w in service.workers)
