"""The Python client against a real API (uvicorn on SQLite, the filesystem broker and local
storage; no worker, so jobs stay queued): submit, get, list across pages, cancel, uploads,
models, and the error mapping (401, 404, 422 naming the field, 429 ridden out)."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image as PILImage

from digin_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    DiginError,
    NotFoundError,
    RateLimitError,
    UnprocessableError,
    WaitTimeoutError,
)
from digin_client._ops import Policy, poll_delay
from tests.client.conftest import LiveAPI, free_port, lite_settings, running
from tests.worker.helpers import digits_params


@pytest.fixture
def key(lite: LiveAPI) -> str:
    return lite.key(f"t-{uuid.uuid4().hex[:8]}")  # a fresh tenant: its lists start empty


@pytest.fixture
def client(lite: LiveAPI, key: str) -> Iterator[Client]:
    with Client(lite.url, key) as client:
        yield client


def png_bytes(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_url_and_key_come_from_the_environment(lite: LiveAPI, key: str, monkeypatch):
    monkeypatch.setenv("DIGIN_URL", lite.url + "/")
    monkeypatch.setenv("DIGIN_API_KEY", key)
    with Client() as client:
        assert client.url == lite.url
        assert "digits:cnn" in {m.spec for m in client.models().models}
    monkeypatch.delenv("DIGIN_URL")
    with Client(api_key=key) as client:
        assert client.url == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="http"):
        Client("127.0.0.1:8000")


def test_submit_get_cancel_and_list(client: Client):
    job = client.submit("guided", digits_params(), seed=7, priority=3, metadata={"run": "a"})
    assert job.status == "queued" and job.seed == 7 and job.priority == 3
    assert job.metadata == {"run": "a"}
    assert job.params["guidance"]["iterations"] == 2  # stored normalised, defaults filled in
    assert isinstance(job.cost, int) and job.cost > 0  # the estimate the deployment caps

    again = client.get(job.id)
    assert again.id == job.id and again.params == job.params and not again.done

    canceled = client.cancel(job.id)
    assert canceled.status == "canceled" and canceled.done
    assert client.cancel(job.id).status == "canceled"  # a finished job is returned unchanged

    other = client.submit("guided", digits_params(), seed=8)
    assert [j.id for j in client.list()] == [other.id, job.id]  # newest first
    assert [j.id for j in client.list(status="canceled")] == [job.id]
    assert [j.id for j in client.list(status=["queued", "canceled"], kind="guided")] == [
        other.id,
        job.id,
    ]
    assert list(client.list(kind="neuron")) == []


def test_list_follows_cursors_over_several_pages(lite: LiveAPI, key: str):
    pages: list[str] = []

    def count(request: httpx.Request) -> None:
        if request.url.path == "/v1/jobs" and request.method == "GET":
            pages.append(str(request.url.params.get("cursor")))

    with Client(lite.url, key, event_hooks={"request": [count]}) as client:
        ids = [client.submit("guided", digits_params(), seed=i).id for i in range(5)]
        listed = [j.id for j in client.list(page_size=2)]
        assert listed == ids[::-1]
        assert len(pages) == 3 and pages[0] == "None" and len(set(pages)) == 3

        pages.clear()
        assert [j.id for j in client.list(limit=3, page_size=2)] == ids[::-1][:3]
        assert len(pages) == 2  # the second page asks for just the one job still wanted


def test_idempotency_key(client: Client):
    first = client.submit("guided", digits_params(), seed=1, idempotency_key="k-1")
    assert client.submit("guided", digits_params(), seed=1, idempotency_key="k-1").id == first.id
    with pytest.raises(UnprocessableError) as info:
        client.submit("guided", digits_params(), seed=2, idempotency_key="k-1")
    assert info.value.field == "Idempotency-Key"


def test_errors_carry_the_problem(lite: LiveAPI, client: Client):
    with Client(lite.url) as anonymous, pytest.raises(AuthenticationError) as info:
        anonymous.get(uuid.uuid4())
    assert info.value.status == 401 and info.value.title == "Unauthorized"
    assert info.value.type.startswith("urn:digin:problem:")
    with Client(lite.url, "not-a-key") as wrong, pytest.raises(AuthenticationError):
        list(wrong.list())

    missing = uuid.uuid4()
    with pytest.raises(NotFoundError) as info:
        client.get(missing)
    assert info.value.status == 404 and str(missing) in (info.value.detail or "")
    with pytest.raises(NotFoundError):
        client.wait(missing, timeout=30)  # not worth polling again: raised at once

    job = client.submit("guided", digits_params())
    with Client(lite.url, lite.key("someone-else")) as other, pytest.raises(NotFoundError):
        other.get(job.id)  # another tenant's job is a 404, never a 403

    with pytest.raises(UnprocessableError) as info:
        client.submit("guided", digits_params(iterations=100_000))
    error = info.value
    assert error.status == 422 and error.field == "params.guidance.iterations"
    assert error.code == "invalid-params" and "500" in error.errors[0].message
    assert "params.guidance.iterations" in str(error)
    assert error.to_dict()["errors"][0]["field"] == "params.guidance.iterations"

    with pytest.raises(UnprocessableError) as info:
        client.submit("no-such-kind", {})
    assert info.value.field == "kind"


def test_a_429_is_waited_out_and_the_request_sent_again(lite_dir: Path):
    with running(lite_settings(lite_dir, max_queued_per_tenant=1)) as live:
        key = live.key(f"capped-{uuid.uuid4().hex[:6]}")
        with Client(live.url, key) as client:
            first = client.submit("guided", digits_params())
            with pytest.raises(RateLimitError) as info:
                client.submit("guided", digits_params())
            assert info.value.retry_after == 30  # the server's Retry-After
            assert info.value.body["limit"] == 1

        refused: list[float | None] = []

        def free_a_slot(response: httpx.Response) -> None:
            """When the cap answers, cancel the queued job (as another process would)."""
            if response.status_code == 429:
                refused.append(float(response.headers["Retry-After"]))
                with Client(live.url, key) as other:
                    other.cancel(first.id)

        # Retry-After is 30 s; honour it only up to 0.1 s so that the test stays fast
        with Client(
            live.url, key, retry_wait_max=0.1, event_hooks={"response": [free_a_slot]}
        ) as client:
            second = client.submit("guided", digits_params(), retry_on_429=True)
        assert refused == [30.0] and second.status == "queued"
        capped = Client(live.url, key, retry_wait_max=0.01, max_retries=2)
        with capped, pytest.raises(RateLimitError):  # still capped after the retries
            capped.submit("guided", digits_params(), retry_on_429=True)


def test_poll_delay_honours_retry_after_and_backs_off():
    policy = Policy(poll_initial=0.5, poll_max=4.0, retry_wait_max=60.0)
    told = httpx.Response(200, headers={"Retry-After": "2"})
    assert poll_delay(told, 0, policy) == 2 and poll_delay(told, 9, policy) == 2
    too_long = httpx.Response(429, headers={"Retry-After": "3600"})
    assert poll_delay(too_long, 0, policy) == 60.0
    silent = httpx.Response(200)
    assert [poll_delay(silent, n, policy) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    dated = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert poll_delay(dated, 0, policy) == 0.0  # a date in the past: poll now


def test_wait_times_out_with_the_last_state(client: Client):
    job = client.submit("guided", digits_params())  # no worker here: it stays queued
    seen: list[str] = []
    with pytest.raises(WaitTimeoutError) as info:
        client.wait(job.id, timeout=0.3, on_progress=lambda j: seen.append(j.status))
    assert info.value.last.id == job.id and info.value.last.status == "queued"
    assert seen and set(seen) == {"queued"}
    with pytest.raises(DiginError, match="artifacts exist once it has succeeded"):
        client.download(job.id, "unused")


def test_upload_image_and_models(client: Client, tmp_path: Path):
    data = png_bytes()
    image = client.upload_image(data)
    assert (image.format, image.width, image.height, image.size_bytes) == ("PNG", 16, 16, len(data))
    path = tmp_path / "start.png"
    path.write_bytes(data)
    assert client.upload_image(path).id == image.id  # the same bytes: the same image
    with pytest.raises(DiginError) as info:
        client.upload_image(b"not an image")
    assert getattr(info.value, "status", None) in (415, 422)

    models = client.models()
    assert "guided" in models.kinds
    assert {"digits", "digits:cnn"} <= {m.spec for m in models.models}


def test_async_client(lite: LiveAPI, key: str):
    async def scenario() -> None:
        async with AsyncClient(lite.url, key) as client:
            jobs = [await client.submit("guided", digits_params(), seed=i) for i in range(3)]
            assert (await client.get(jobs[0].id)).id == jobs[0].id
            listed = [j.id async for j in client.list(page_size=2)]
            assert listed == [j.id for j in reversed(jobs)]
            assert (await client.cancel(jobs[1].id)).status == "canceled"
            assert [j.id async for j in client.list(status="canceled")] == [jobs[1].id]
            with pytest.raises(NotFoundError):
                await client.get(uuid.uuid4())
            with pytest.raises(UnprocessableError) as info:
                await client.submit("guided", digits_params(iterations=501))
            assert info.value.field == "params.guidance.iterations"
            with pytest.raises(WaitTimeoutError):
                await client.wait(jobs[0].id, timeout=0.2)
            image = await client.upload_image(png_bytes(8))
            assert image.width == 8
            assert "digits:cnn" in {m.spec for m in (await client.models()).models}
        async with AsyncClient(lite.url) as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.get(jobs[0].id)

    asyncio.run(scenario())


def test_no_server_is_a_connection_error():
    client = Client(f"http://127.0.0.1:{free_port()}", timeout=2)
    with client, pytest.raises(DiginError, match="GET") as info:
        client.get(uuid.uuid4())
    assert type(info.value).__name__ == "DiginConnectionError"


def test_wait_rides_out_a_server_that_is_not_up_yet(lite: LiveAPI, lite_dir: Path, key: str):
    """The first polls find no server (connection refused); `wait` backs off and goes on once
    an API answers on that port."""
    import threading

    with Client(lite.url, key) as client:
        job = client.submit("guided", digits_params())
    refused = threading.Event()

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            try:
                return super().handle_request(request)
            except httpx.ConnectError:
                refused.set()
                raise

    port = free_port()
    with Client(f"http://127.0.0.1:{port}", key, transport=Recording()) as client:
        reads: list[str] = []
        outcome: list[object] = []

        def poll() -> None:
            try:
                outcome.append(
                    client.wait(
                        job.id,
                        timeout=120,
                        until=lambda j: True,
                        on_progress=lambda j: reads.append(j.status),
                    )
                )
            except Exception as exc:  # reported below
                outcome.append(exc)

        poller = threading.Thread(target=poll)
        poller.start()
        assert refused.wait(timeout=60), "the client never tried to connect"
        with running(lite_settings(lite_dir), port=port):
            poller.join(timeout=120)
    assert reads == ["queued"] and getattr(outcome[0], "id", None) == job.id, outcome
