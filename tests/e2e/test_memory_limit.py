"""The memory guard in a real Celery worker (docs/architecture.md §8.10): a CPU worker's pool
process runs under DIGIN_WORKER_MEMORY_LIMIT_MB; a job that needs more fails with
`resource_limit`, and the same process goes on to run the next job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from digin.service.db import TERMINAL
from tests.e2e.conftest import Service, make_service, submit, wait_status
from tests.worker.test_memory_guard import BIG, LIMIT_MB, SMALL


@pytest.fixture(scope="module")
def guarded(
    postgresql_url: str, redis_url: str, s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:  # fmt: skip
    folder: Path = tmp_path_factory.mktemp("e2e-memory")
    service = make_service(postgresql_url, redis_url, s3_endpoint, folder,
                           worker_memory_limit_mb=LIMIT_MB, max_batch=64)  # fmt: skip
    try:
        yield service
    finally:
        service.close()


def test_a_job_over_the_memory_limit_fails_and_the_worker_takes_the_next(guarded: Service):
    worker = guarded.start_worker()
    before = wait_status(guarded, submit(guarded, "mem", SMALL).id, TERMINAL)
    assert before.status == "succeeded", before.error

    big = wait_status(guarded, submit(guarded, "mem", BIG).id, TERMINAL)
    assert big.status == "failed" and big.error is not None, big.error
    assert big.error["code"] == "resource_limit" and not big.error["retryable"]
    assert f"{LIMIT_MB} MB" in big.error["message"]

    after = wait_status(guarded, submit(guarded, "mem", SMALL).id, TERMINAL)
    assert after.status == "succeeded", after.error
    # one pool process ran all three: it lived through the refused allocation
    assert before.worker and big.worker and after.worker
    assert before.worker["pid"] == big.worker["pid"] == after.worker["pid"]
    assert worker.proc.poll() is None
    limits = [line for line in worker.lines() if line.get("event") == "memory_limit"]
    assert limits and limits[0]["limit_mb"] == LIMIT_MB
