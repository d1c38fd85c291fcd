"""The streaming operations (downloads, the results index, lists) of both clients against an
httpx mock server: bodies arrive in chunks that split lines, a stream breaks halfway, a caller
stops iterating early; every streamed response is closed either way. (The live API tests cover
the same methods end to end; these make the failures happen on purpose.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from digin_client import AsyncClient, Client, DiginConnectionError, NotFoundError

URL = "http://digin.test"


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body sent in these chunks, then broken (a ReadError) if `broken`; what
    `on_start()` says when it starts being read is kept in `seen_at_start`."""

    def __init__(
        self, chunks: list[bytes], broken: bool = False, on_start: Callable[[], object] = bool
    ) -> None:
        self.chunks, self.broken, self.closed = chunks, broken, False
        self.on_start, self.seen_at_start = on_start, None

    def _parts(self) -> Iterator[bytes]:
        self.seen_at_start = self.on_start()
        yield from self.chunks
        if self.broken:
            raise httpx.ReadError("the connection broke")

    def __iter__(self) -> Iterator[bytes]:
        return self._parts()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self._parts():
            yield part

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


RECORDS = [
    {"index": i, "custom_id": f"item-{i}", "job_id": f"j{i}", "status": "queued"} for i in range(3)
]
LINES = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS).rstrip(b"\n")  # no last \n


def mock_server(bodies: dict[str, Chunks], requests: list[str]) -> httpx.MockTransport:
    """The API (and S3 behind its redirects) with these streamed bodies; `requests` gets the
    path of every request."""

    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        requests.append(path)
        if request.url.host == "digin.test" and path.startswith("/v1/jobs/j1/artifacts/"):
            name = path.rsplit("/", 1)[1]
            return httpx.Response(307, headers={"Location": f"http://s3.test/{name}"})
        if path == "/v1/jobs/j1/artifacts":
            data = [{"name": n, "url": f"/x/{n}"} for n in ("a.png", "b.png")]
            return httpx.Response(200, json={"job_id": "j1", "status": "succeeded", "data": data})
        if path == "/v1/jobs":
            page = int(request.url.params.get("cursor") or 0)
            jobs = [job(f"j{page * 2 + i}") for i in range(2)]
            return httpx.Response(200, json={"data": jobs, "next_cursor": str(page + 1)})
        key = path.rsplit("/", 1)[1]
        if key in bodies:
            return httpx.Response(200, stream=bodies[key])
        return httpx.Response(404, json={"title": "Not Found", "status": 404, "detail": path})

    return httpx.MockTransport(answer)


def job(job_id: str) -> dict[str, Any]:
    return {"id": job_id, "kind": "guided", "status": "queued", "params": {}, "seed": 0,
            "priority": 5, "created_at": "2025-01-01T00:00:00Z"}  # fmt: skip


def run(
    flavour: str,
    bodies: dict[str, Chunks],
    scenario: Callable[[Any], Any],
    requests: list[str] | None = None,
) -> Any:
    """`scenario(client)` with a Client, or awaited with an AsyncClient, on the mock server."""
    transport = mock_server(bodies, [] if requests is None else requests)
    if flavour == "sync":
        with Client(URL, transport=transport) as client:
            return scenario(client)

    async def main() -> Any:
        async with AsyncClient(URL, transport=transport) as client:
            return await scenario(client)

    return asyncio.run(main())


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_download_that_breaks_leaves_no_partial_file(flavour: str, tmp_path: Path):
    bodies = {"a.png": Chunks([b"PNG", b"-a"]), "b.png": Chunks([b"PNG"], broken=True)}
    with pytest.raises(DiginConnectionError, match=r"^downloading b\.png: ReadError"):
        run(flavour, bodies, lambda client: client.download("j1", tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert (tmp_path / "a.png").read_bytes() == b"PNG-a"
    assert all(body.closed for body in bodies.values())

    a = Chunks([b"A"])
    b = Chunks([b"B", b"", b"B"], on_start=lambda: a.closed)
    paths = run(flavour, {"a.png": a, "b.png": b}, lambda c: c.download("j1", tmp_path / "2"))
    assert [p.read_bytes() for p in paths] == [b"A", b"BB"]
    assert b.seen_at_start is True  # a's response was closed (its connection free) once read
    assert b.closed


def test_a_download_of_a_missing_artifact_writes_nothing(flavour: str, tmp_path: Path):
    bodies = {"a.png": Chunks([b"A"])}  # b.png: 404 behind the redirect
    with pytest.raises(NotFoundError):
        run(flavour, bodies, lambda client: client.download("j1", tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_result_lines_split_across_chunks(flavour: str):
    cuts = [0, 7, 40, 41, 90, len(LINES)]
    body = Chunks([LINES[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])

    async def collect(client: AsyncClient) -> list[str]:
        return [r.custom_id async for r in client.iter_results("b1")]

    def scenario(client: Any) -> Any:
        if isinstance(client, Client):
            return [r.custom_id for r in client.iter_results("b1")]
        return collect(client)

    assert run(flavour, {"results": body}, scenario) == ["item-0", "item-1", "item-2"]
    assert body.closed


def test_stopping_early_closes_the_stream_and_stops_paging(flavour: str):
    body = Chunks([LINES])
    requests: list[str] = []

    async def first(items: AsyncIterator[Any]) -> Any:
        async for item in items:
            await items.aclose()  # type: ignore[attr-defined]  # an async generator
            return item

    async def first_of_each(client: AsyncClient) -> tuple[Any, Any]:
        return await first(client.iter_results("b1")), await first(client.list())

    def scenario(client: Any) -> Any:
        if isinstance(client, Client):  # the generators are closed as they are dropped
            return next(iter(client.iter_results("b1"))), next(iter(client.list()))
        return first_of_each(client)

    record, job = run(flavour, {"results": body}, scenario, requests)
    assert (record.index, job.id) == (0, "j0")
    assert body.closed
    assert requests.count("/v1/jobs") == 1  # one page read, no more
