"""The API's routers: `/v1` (jobs, batches, their live events, webhooks, images, models) and
the unversioned system routes.

Each router carries its full prefix (`/v1/jobs`), so a route's own path is its template, the
label of the request metrics.
"""

from fastapi import APIRouter

from digin.api.routes import batches, events, images, jobs, models, system, webhooks

ROUTERS: list[APIRouter] = [
    jobs.router,
    batches.router,
    events.router,
    webhooks.router,
    images.router,
    models.router,
    system.router,
]

__all__ = ["ROUTERS"]
