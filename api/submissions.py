"""The API's job writer: group commit of `POST /v1/jobs` (docs/architecture.md §8.3).

Each submission's API key is checked and its body validated in its request (the key first:
`digin.api.deps.WritingTenantDep`), then it is handed, with its tenant's id, to one writer
thread per API process. The writer takes every submission waiting at that moment (up to
`max_batch`) and for all of them together:

1. locks the tenants, checks caps and idempotency keys and inserts the jobs in ONE transaction
   (`digin.service.repo.submit.submit_jobs`), and commits;
2. sends each created job's message (after the commit, as always: a worker that runs it finds
   the row), through one broker connection;
3. records the send times (`enqueued_at`) in one statement and commits;
4. answers each request with its own outcome.

Under load the requests that arrive while a group is written form the next group, so the
database work per job shrinks as the rate grows (a few statements per group instead of eight
per job); an idle API writes groups of one with no added delay. A broker error leaves the
job queued with no `enqueued_at` for the reaper to re-send, as before.

A database error while a group is written commits nothing of it. If the database is away, the
group's requests fail (503). Any other error (a row the database refuses) must not fail the
other submissions, often other tenants': the writer then writes each submission of the group in
a transaction of its own, in order, and only the one whose own write fails gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from typing import cast

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from digin.api.metrics import Metrics
from digin.api.problems import database_unavailable
from digin.service.db import Job, utcnow
from digin.service.dispatch import enqueue
from digin.service.repo.submit import Outcome, Submission, mark_sent, submit_jobs

log = logging.getLogger(__name__)

MAX_BATCH = 256  # submissions written together at most
_STOP = object()
_Item = tuple[Submission, "Future[Outcome]"]


class JobWriter:
    """One writer thread: `await writer.submit(submission)` → its Outcome."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        celery: Celery,
        metrics: Metrics,
        *,
        max_batch: int = MAX_BATCH,
        on_group: Callable[[int], None] | None = None,
    ) -> None:
        self.sessions, self.celery, self.metrics = sessions, celery, metrics
        self.max_batch, self.on_group = max_batch, on_group
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- the request side -------------------------------------------------------------------
    async def submit(self, submission: Submission) -> Outcome:
        return await asyncio.wrap_future(self.submit_future(submission))

    def submit_future(self, submission: Submission) -> Future[Outcome]:
        self._start()
        future: Future[Outcome] = Future()
        self._queue.put((submission, future))
        return future

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="job-writer", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is waiting, then stop the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)

    # --- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            group: list[_Item] = [cast(_Item, first)]
            stop = False
            while len(group) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                group.append(cast(_Item, item))
            # requests whose client went away before their turn are not written
            live = [(s, f) for s, f in group if f.set_running_or_notify_cancel()]
            try:
                if live:
                    self._write(live)
            except BaseException as exc:  # never leave a request waiting for ever
                log.exception("the job writer failed on a group of %d", len(live))
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            if stop:
                return

    def _write(self, group: list[tuple[Submission, Future[Outcome]]]) -> None:
        """Write one group (its futures are running: set each exactly once)."""
        if self.on_group is not None:
            self.on_group(len(group))
        with self.sessions() as session:
            try:
                outcomes: list[Outcome | None] = list(self._commit(session, [s for s, _ in group]))
            except Exception as exc:  # nothing of the group was committed
                if len(group) == 1 or database_unavailable(exc):
                    for _, future in group:
                        future.set_exception(exc)
                    return
                log.warning(
                    "a group of %d submissions failed (%s: %s); writing each on its own",
                    len(group), type(exc).__name__, exc,
                )  # fmt: skip
                outcomes = self._one_by_one(session, group)
            created = [o.job for o in outcomes if o is not None and o.created and o.job]
            sent = self._send(created)
            try:
                mark_sent(session, sent)
                session.commit()
            except Exception as exc:  # the jobs exist and their messages are out: only the
                session.rollback()  # times are lost (the reaper re-sends, claims are atomic)
                log.warning("could not record enqueued_at of %d job(s): %s", len(sent), exc)
            else:
                times = dict(sent)
                for job in created:
                    job.enqueued_at = times.get(job.id)
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if outcome is not None:
                future.set_result(outcome)

    @staticmethod
    def _commit(session: Session, submissions: list[Submission]) -> list[Outcome]:
        """Write and commit `submissions` in one transaction; rolled back if it fails."""
        try:
            outcomes = submit_jobs(session, submissions)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return outcomes

    def _one_by_one(
        self, session: Session, group: list[tuple[Submission, Future[Outcome]]]
    ) -> list[Outcome | None]:
        """After a group failed: each submission in a transaction of its own, in order (the
        outcomes one-by-one writes give), so that the one whose row the database refuses fails
        alone: its request gets the error (None in its place), every other is written."""
        outcomes: list[Outcome | None] = []
        for submission, future in group:
            try:
                (outcome,) = self._commit(session, [submission])
            except Exception as exc:
                log.warning("a submission failed on its own (%s: %s)", type(exc).__name__, exc)
                future.set_exception(exc)
                outcomes.append(None)
            else:
                outcomes.append(outcome)
        return outcomes

    def _send(self, jobs: list[Job]) -> list[tuple[uuid.UUID, datetime]]:
        """Send the committed jobs' messages through one producer; (id, time) of those sent.
        A broker error stops the sending: the rest stay queued for the reaper to re-send."""
        sent: list[tuple[uuid.UUID, datetime]] = []
        if not jobs:
            return sent
        for job in jobs:
            self.metrics.jobs_created.labels(job.kind).inc()
        try:
            with self.celery.producer_or_acquire() as producer:
                for job in jobs:
                    enqueue(
                        self.celery, job_id=str(job.id), queue=job.queue,
                        priority=job.priority, producer=producer,
                    )  # fmt: skip
                    sent.append((job.id, utcnow()))
        except Exception as exc:
            unsent = len(jobs) - len(sent)
            for job in jobs[len(sent) :]:
                self.metrics.enqueue_failures.labels(job.queue).inc()
            log.warning(
                "%d job(s) are queued but their messages could not be sent (%s: %s); the "
                "reaper re-sends them", unsent, type(exc).__name__, exc,
            )  # fmt: skip
        return sent
