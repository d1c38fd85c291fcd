"""An audit's dashboard page in Chromium against a running `digin serve` (embedded mode, a real
Celery worker on the digits zoo): an audit of every class of the zoo's spurious classifier,
submitted through the REST API, shows its ranked table with the images once its report is
built; the table is the report's (same order, same numbers), every image renders, and the
report downloads from the page, through the Python client and through `digin audit report`.
The screenshot (`test-artifacts/ui/audit.png`, cropped) is the README's docs/audit-page.png."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from digin.api.dashboard import number
from digin.cli import app
from digin_client import Client
from tests.e2e.conftest import wait_until
from tests.ui.conftest import natural_widths, screenshot
from tests.ui.test_embedded import Embedded, embedded  # noqa: F401 - the module's server

AUDIT_TIMEOUT_S = 900.0  # ten classes and the follow-ups of the flagged ones, one CPU worker
BODY = {
    "classifier": "digits:cnn-spurious",
    "classes": "all",
    "images": {"digits": "test", "per_class": 30},
    "guidance": {"iterations": 2},
    "budget": {"images_per_component": 1},
    "seed": 0,
}


def test_an_audits_page_shows_the_reports_ranking_with_its_images(
    page: Any,
    embedded: Embedded,  # noqa: F811
    tmp_path: Path,
):
    created = embedded.http.post("/v1/audits", json=BODY)
    assert created.status_code == 202, created.text
    audit_id = created.json()["id"]
    page.goto(f"{embedded.url}/ui/audits")
    assert page.inner_text(f"a[href='/ui/audits/{audit_id}']") == audit_id[:8]

    def finished() -> dict[str, Any] | None:
        audit = embedded.http.get(f"/v1/audits/{audit_id}").json()
        return audit if audit["status"] != "running" else None

    audit = wait_until("the audit to finish", finished, AUDIT_TIMEOUT_S, 1.0)
    assert audit["status"] == "succeeded", (audit, embedded.log.read_text()[-3000:])
    report = embedded.http.get(f"/v1/audits/{audit_id}/report").json()

    page.goto(f"{embedded.url}/ui/audits/{audit_id}")
    assert page.inner_text("#audit-status") == "succeeded"
    shown = page.eval_on_selector_all(
        "#ranking tbody tr", "rows => rows.map(r => r.dataset.className)"
    )
    assert shown == [row["class_name"] for row in report["classes"]]
    assert shown[0] == "seven"
    first = report["classes"][0]
    cells = page.eval_on_selector_all(
        "#ranking tbody tr:first-child td", "cells => cells.map(c => c.innerText.trim())"
    )
    assert cells[3] == number(first["auc"], 3) and cells[4] == number(first["min_auc"], 3)
    widths = natural_widths(page, "#ranking img")
    images = sum(1 + len(c["visualizations"]) for r in report["classes"] for c in r["components"])
    assert len(widths) == images and all(w > 0 for w in widths), widths
    screenshot(page, "audit")

    # the Python client and `digin audit report` download the same report
    with Client(embedded.url) as digin:
        html = io.BytesIO()
        assert digin.audit_report(audit_id, html, format="html") == len(html.getvalue())
        assert html.getvalue().startswith(b"<!DOCTYPE html>")
    out = tmp_path / "report.json"
    args = ["audit", "report", audit_id, "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"DIGIN_URL": embedded.url})
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == report

    # the audit's jobs have the dashboard's job pages, and its batch the batch page
    for path in (f"/ui/jobs/{audit['report_job_id']}", f"/ui/jobs/{audit['classes'][7]['job_id']}",
                 f"/ui/batches/{audit_id}"):  # fmt: skip
        assert page.goto(f"{embedded.url}{path}").status == 200, path
    page.goto(f"{embedded.url}/ui/audits/{audit_id}")
    with page.expect_download() as download:
        page.click("#report-json")
    saved = json.loads(Path(download.value.path()).read_text())
    assert [r["class_name"] for r in saved["classes"]] == shown
