"""The service layer both the HTTP API and the workers use (docs/architecture.md §9): the
database models and engines (`db`), the repositories (`repo`), artifact storage, settings,
the Celery dispatch, API-key hashing and webhook signing with its address guard. Torch-free,
and free of HTTP: nothing here imports FastAPI or the `api` package."""
