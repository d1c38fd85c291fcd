"""A job's dashboard page follows the job's live events (EventSource on /ui/jobs/{id}/events)
in headless Chromium: the status and the progress change on the page without a reload, and the
page reloads itself once the job has finished. The job is moved along by the repository
functions a worker uses (no worker process)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from digin.service import repo
from digin.service.db import make_engine, session_factory
from tests.client.conftest import LiveAPI, lite_settings, serve
from tests.ui.test_auth import login, submit

WORKER = {"host": "test", "pid": 1}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAPI]:
    settings = lite_settings(tmp_path_factory.mktemp("ui-events"), secret_key="s" * 40)
    yield from serve(settings)


def test_the_job_page_updates_from_the_stream(page: Any, live: LiveAPI):
    key = live.key("ui-events")
    job = submit(live, key)
    login(page, live, key)
    page.goto(f"{live.url}/ui/jobs/{job['id']}")
    page.wait_for_function("() => document.querySelector('main').dataset.status === 'queued'")
    # the page keeps a marker: a reload (the polling fallback's way) would drop it
    page.evaluate("() => { window.notReloaded = true; }")
    engine = make_engine(live.settings.database_url)
    sessions = session_factory(engine)
    try:
        job_id = uuid.UUID(job["id"])
        with sessions() as session:
            claimed = repo.claim_job(session, job_id=job_id, worker=WORKER)
            session.commit()
            assert claimed is not None
            progress = {"step": 1, "total": 4, "stage": "optimizing"}
            repo.heartbeat(session, job_id=job_id, attempt=claimed.attempts, progress=progress)
            session.commit()
        page.wait_for_function(
            "() => document.querySelector('main').dataset.status === 'running'"
            " && window.notReloaded === true"
        )
        page.wait_for_function(
            "() => (document.querySelector(\"main [data-role='stage']\") || {}).textContent"
            " === 'optimizing 1/4'"
        )
        with sessions() as session:
            result = {"summary": {}, "artifacts": []}
            assert repo.finish_job(session, job_id=job_id, attempt=claimed.attempts, result=result)
            session.commit()
        # finished: the page reloads itself and shows the final state
        page.wait_for_function("() => window.notReloaded === undefined")
        page.wait_for_function(
            "() => document.querySelector('main').dataset.status === 'succeeded'"
        )
    finally:
        engine.dispose()
