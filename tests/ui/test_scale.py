"""The dashboard with 10,000 jobs in the database (SQLite): pages read one page of rows, the
cursor pages neither repeat nor skip, and a 2,000-item batch's matrix is paged by classes.
Render times are printed (bench/dashboard.py records them); nothing here is timed."""

from __future__ import annotations

import re
import time
from pathlib import Path

from fastapi.testclient import TestClient

from bench.dashboard import seed
from digin.api.app import create_app
from digin.service.db import make_engine, migrate, session_factory
from digin.service.settings import fresh_settings
from digin.service.storage import storage_from_settings

ROW = re.compile(r'<tr class="job-row" data-live-job="([0-9a-f-]{36})"')
NEXT = re.compile(r'<a href="([^"]+)" id="next-page"')


def test_pages_with_10000_jobs(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'digin.db'}"
    migrate(url)
    settings = fresh_settings(data_dir=tmp_path / "data", database_url=url)
    engine = make_engine(url)
    ids = seed(session_factory(engine), storage_from_settings(settings), jobs=10_000,
               batch_classes=1000)  # fmt: skip
    engine.dispose()
    with TestClient(create_app(settings)) as client:
        seen: list[str] = []
        path = "/ui/jobs"
        for _ in range(4):
            started = time.perf_counter()
            page = client.get(path)
            print(f"{path[:40]}: {1000 * (time.perf_counter() - started):.1f} ms")
            rows = ROW.findall(page.text)
            assert page.status_code == 200 and len(rows) == 50
            seen += rows
            path = NEXT.search(page.text).group(1).replace("&amp;", "&")
        assert len(set(seen)) == 200 and seen[0] == str(ids["newest"])  # newest first

        failed = client.get("/ui/jobs?status=failed").text
        assert len(ROW.findall(failed)) == 50 and failed.count('data-status="failed"') == 50

        batch = client.get(f"/ui/batches/{ids['batch_id']}?page=7")
        assert batch.status_code == 200
        assert "page 7 of 50 (1000 classes)" in batch.text
        assert batch.text.count('class="cell ') == 40  # 20 classes x 2 classifiers
        assert ">120<" in batch.text and ">139<" in batch.text and ">140<" not in batch.text

        thumb = client.get(f"/ui/jobs/{ids['newest']}/thumbs/item_000.png")
        assert thumb.status_code == 200 and thumb.headers["cache-control"].startswith("private")
        again = client.get(f"/ui/jobs/{ids['newest']}/thumbs/item_000.png",
                           headers={"If-None-Match": thumb.headers["etag"]})  # fmt: skip
        assert again.status_code == 304 and again.content == b""
