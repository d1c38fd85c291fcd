"""The dashboard in Chromium against a running `digin serve` (embedded mode: SQLite, the
filesystem broker, a real Celery worker on the digits zoo, auth off) in a temporary folder:
jobs submitted through the REST API finish on the page without a reload, their images render
(natural width > 0) and the numbers on the page are the API's; cancel from a job's page; a
batch's class x classifier matrix fills in as its items finish. Screenshots go to
`test-artifacts/ui/`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from digin.api.dashboard import number
from tests.e2e.conftest import wait_until
from tests.e2e.test_embedded import free_port, stop_tree
from tests.ui.conftest import JOB_TIMEOUT_MS, natural_widths, screenshot
from tests.worker.helpers import ROOT

TERMINAL = ("succeeded", "failed", "canceled")


class Embedded:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log
        self.http = httpx.Client(base_url=url, timeout=30)

    def submit(self, params: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        response = self.http.post("/v1/jobs", json={"kind": "guided", "params": params,
                                                    "seed": seed})  # fmt: skip
        assert response.status_code == 202, response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/jobs/{job_id}").json()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    """`digin serve` in an empty folder, shared by the module's tests."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the process-tree cleanup reads /proc")
    folder = tmp_path_factory.mktemp("ui-embedded")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGIN_")}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env |= {"DIGIN_DATA_DIR": str(folder / ".digin"), "DIGIN_PORT": str(port),
            "DIGIN_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # fmt: skip
    log = folder / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "digin", "serve"], cwd=folder, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    service = Embedded(f"http://127.0.0.1:{port}", log)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"digin serve exited ({proc.returncode}):\n{log.read_text()}")
        try:
            return service.http.get("/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until("the API to answer", healthy, 90, 0.25)
        yield service
    finally:
        service.http.close()
        stop_tree(proc)


def test_a_job_finishes_on_the_jobs_page_and_its_page_shows_the_apis_numbers(page, embedded):
    job = embedded.submit({"classes": ["seven", "three"], "guidance": {"iterations": 2}})
    page.goto(f"{embedded.url}/ui/jobs")
    row = f"tr[data-live-job='{job['id']}']"
    assert page.get_attribute(row, "data-status") in ("queued", "running")
    page.evaluate("window.__notReloaded = true")
    # the page script polls /ui/jobs/live and swaps in the finished row: no reload
    page.wait_for_selector(f"{row}[data-status='succeeded']", timeout=JOB_TIMEOUT_MS)
    assert page.evaluate("window.__notReloaded") is True
    api = embedded.job(job["id"])
    assert api["status"] == "succeeded", (api, embedded.log.read_text()[-3000:])
    items = api["result"]["summary"]["items"]
    mean_p = sum(item["best"]["p"] for item in items) / len(items)
    assert page.inner_text(f"{row} .metric-value") == number(mean_p)
    assert natural_widths(page, f"{row} img") == [16]  # the digits' own size: never enlarged
    screenshot(page, "jobs")

    # the job's page: every image renders, every confidence is the API's
    page.click(f"{row} a[href='/ui/jobs/{job['id']}']")
    page.wait_for_url(f"{embedded.url}/ui/jobs/{job['id']}")
    widths = natural_widths(page)
    assert len(widths) == 1 + 2 * len(items) and all(w > 0 for w in widths), widths
    for item in items:
        card = f"article[data-item='{item['index']}']"
        assert page.inner_text(f"{card} h3") == item["class_name"]
        for name in ("p", "clean_loss"):
            cell = f"{card} td[data-metric='{name}']"
            assert page.inner_text(cell) == number(item["best"][name])
            assert float(page.get_attribute(cell, "data-value")) == item["best"][name]
        best_row = f"{card} table.numbers tr.best td"
        assert page.text_content(best_row) == str(item["best_iteration"])  # in a <details>
    assert page.inner_text("main [data-role=status]") == "succeeded"
    assert page.inner_text("#job-seed") == str(api["seed"]) == "0"
    assert '"classes": [\n    "seven",\n    "three"\n  ]' in page.inner_text("#params")
    assert page.query_selector("#cancel") is None  # finished: nothing to cancel
    screenshot(page, "job")


def test_cancel_from_the_job_page(page, embedded):
    job = embedded.submit({"classes": ["one"], "guidance": {"iterations": 300}})
    page.goto(f"{embedded.url}/ui/jobs/{job['id']}")
    page.wait_for_selector("main[data-status='running']", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector("main [data-role=progress]:not([hidden])")
    page.click("#cancel")
    # canceling until the worker stops (within one iteration); the page reloads when it ends
    page.wait_for_selector("main[data-status='canceled']", timeout=JOB_TIMEOUT_MS)
    assert embedded.job(job["id"])["status"] == "canceled"
    screenshot(page, "canceled")


def test_the_batch_page_fills_its_class_by_classifier_matrix(page, embedded):
    body = {"kind": "guided", "params_template": {"guidance": {"iterations": 1}},
            "classes": [1, 7], "classifiers": ["digits:cnn", "digits:mlp"],
            "seeds": [0]}  # fmt: skip
    created = embedded.http.post("/v1/batches", json=body)
    assert created.status_code == 202, created.text
    batch = created.json()
    page.goto(f"{embedded.url}/ui/batches/{batch['id']}")
    headers = page.eval_on_selector_all(
        "#matrix thead th code", "els => els.map(e => e.textContent)"
    )
    assert headers == ["digits:cnn", "digits:mlp"]
    rows = page.eval_on_selector_all("#matrix tbody th", "els => els.map(e => e.innerText)")
    assert rows == ["1 · one", "7 · seven"]
    # the page script follows the counts and items, and reloads as they finish
    page.wait_for_selector("main[data-batch-status]:not([data-batch-status='running'])",
                           timeout=JOB_TIMEOUT_MS)  # fmt: skip
    api = embedded.http.get(f"/v1/batches/{batch['id']}").json()
    assert api["status"] == "succeeded" and api["counts"]["succeeded"] == 4, api
    assert page.inner_text("#batch-status") == api["status"]
    assert page.get_attribute("[data-count='succeeded']", "data-value") == "4"
    index = embedded.http.get(f"/v1/batches/{batch['id']}/results").text.splitlines()
    results = {line["job_id"]: line for line in map(json.loads, index)}
    cells = page.eval_on_selector_all(
        "#matrix a.cell",
        "els => els.map(e => [e.dataset.liveJob, e.querySelector('.cell-text').innerText])",
    )
    assert len(cells) == 4 and {job_id for job_id, _ in cells} == set(results)
    for job_id, text in cells:
        assert text == f"p {number(results[job_id]['metrics']['p'], 2)}"
    widths = natural_widths(page, "#matrix img")
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    screenshot(page, "batch")
    page.click(f"#matrix a.cell[data-live-job='{cells[0][0]}']")
    page.wait_for_url(f"{embedded.url}/ui/jobs/{cells[0][0]}")
    page.goto(f"{embedded.url}/ui/batches")
    assert page.query_selector(f"a[href='/ui/batches/{batch['id']}']") is not None


def test_unknown_job_is_a_404_page_and_views_may_be_framed_by_self_only(page, embedded):
    response = page.goto(f"{embedded.url}/ui/jobs/00000000-0000-0000-0000-000000000000")
    assert response.status == 404 and "no job" in page.inner_text("#error-message")
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'self'" in csp
    page.goto(f"{embedded.url}/ui/models")
    specs = page.eval_on_selector_all(
        "#models-table tr[data-spec]", "els => els.map(e => e.dataset.spec)"
    )
    api_specs = [m["spec"] for m in embedded.http.get("/v1/models").json()["models"]]
    assert specs == api_specs
    screenshot(page, "models")
