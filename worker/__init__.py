"""The Celery workers and the reaper: thin adapters over `digin.core.jobs` and `digin.service.repo`
(docs/architecture.md §8, §9.3, §9.4). `digin.worker.app:app` is the Celery app;
`digin.worker.runner.execute_job` is the task."""
