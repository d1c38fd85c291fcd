"""S3 unreachable while jobs upload (connections refused, the objects kept): a job whose
attempts are used up fails with `storage_unavailable` and keeps no artifacts; a job with
attempts left is re-queued with backoff and succeeds once S3 is back, with all its artifacts.
A job is never `succeeded` without its artifacts."""

from __future__ import annotations

from digin.service.db import QUEUED, RUNNING
from digin.service.storage import artifact_key
from tests.reliability.stack import deployment, wait_until
from tests.worker.helpers import artifact_names, digits_params


def test_s3_outage_retries_then_succeeds_or_fails_clearly_at_the_cap(servers: dict):
    proxy = servers["s3"].proxy
    with deployment(**servers) as dep:
        dep.start_worker("w1")
        capped = dep.submit("rel-s3", digits_params(iterations=3), max_attempts=1)
        retried = dep.submit("rel-s3", digits_params(iterations=3), max_attempts=3)
        wait_until("the first job to run",
                   lambda: dep.rows([capped])[capped].status == RUNNING, 120, 0.05)  # fmt: skip
        proxy.down()
        try:
            wait_until(
                "the second job to be re-queued after its upload failed",
                lambda: (r := dep.rows([retried])[retried]).status == QUEUED and r.attempts >= 1,
                150,
                0.05,
            )
        finally:
            proxy.up()
        rows = dep.wait_terminal([capped, retried], timeout=120)

        failed, succeeded = rows[capped], rows[retried]
        assert (failed.status, failed.attempts, failed.error["code"]) == (
            "failed", 1, "storage_unavailable")  # fmt: skip
        assert "could not store artifact" in failed.error["message"]
        assert failed.result is None
        assert dep.storage.list(artifact_key("rel-s3", capped, "x")[:-1]) == []

        assert (succeeded.status, succeeded.attempts, succeeded.error) == ("succeeded", 2, None)
        keys = dep.storage.list(artifact_key("rel-s3", retried, "x")[:-1])
        assert keys == [artifact_key("rel-s3", retried, n) for n in artifact_names(1)]
        assert [a["key"] for a in succeeded.result["artifacts"]] == keys
        for entry in succeeded.result["artifacts"]:
            assert len(dep.storage.get(entry["key"])) == entry["size"]
        print(f"\ns3 outage: {proxy.outages} outage, capped job failed after 1 attempt, "
              f"retried job succeeded on attempt {succeeded.attempts}")  # fmt: skip
