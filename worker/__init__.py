"""The Celery workers and the reaper: thin adapters over `core.jobs` and `api.repo`
(DESIGN §5.3). `worker.app:app` is the Celery app; `worker.runner.execute_job` is the task."""
