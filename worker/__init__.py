"""The Celery workers and the reaper: thin adapters over `core.jobs` and `api.repo`
(docs/architecture.md §8, §9.3, §9.4). `worker.app:app` is the Celery app;
`worker.runner.execute_job` is the task."""
