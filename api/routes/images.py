"""`/v1/images`: upload a start image (validated by `digin.api.images`), read its record."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile

from digin.api.deps import (
    KeyFirstRoute,
    MetricsDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TenantDep,
)
from digin.api.images import FIELD, check_image
from digin.api.problems import not_found, problem_responses
from digin.api.schemas import ImagePublic
from digin.service import repo
from digin.service.storage import image_key

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/images", tags=["images"], route_class=KeyFirstRoute)

ImageFile = Annotated[
    UploadFile,
    File(
        alias=FIELD,
        description="the image (formats: DIGIN_IMAGE_FORMATS; at most DIGIN_MAX_IMAGE_BYTES "
        "bytes and DIGIN_MAX_IMAGE_PIXELS pixels)",
    ),
]


@router.post(
    "",
    status_code=201,
    summary="Upload a start image",
    response_description="created: the image record (its id goes into job params)",
    responses={
        200: {"model": ImagePublic, "description": "the tenant uploaded these bytes before"},
        **problem_responses(401, 413, 415, 422),
    },
)
def upload_image(
    file: ImageFile,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    metrics: MetricsDep,
) -> ImagePublic:
    # 1. Validate everything before anything is written
    data = file.file.read(settings.max_image_bytes + 1)
    checked = check_image(
        data,
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        formats=settings.image_formats,
    )
    # 2. Store the bytes (content-addressed), then the row that points at them
    key = image_key(tenant.name, checked.sha256, checked.extension)
    stored_before = storage.exists(key)
    if not stored_before:
        storage.put(key, checked.data, checked.content_type)
    try:
        image, created = repo.create_image(
            session, tenant_id=tenant.id, sha256=checked.sha256, format=checked.format,
            width=checked.width, height=checked.height, size_bytes=len(checked.data),
            storage_key=key,
        )  # fmt: skip
        session.commit()
    except Exception:
        session.rollback()
        if not stored_before:  # no object without its row
            try:
                storage.delete_prefix(key)
            except Exception as exc:
                log.warning("could not remove the orphaned upload %s: %s", key, exc)
        raise
    if created:
        metrics.images_uploaded.inc()
    else:
        response.status_code = 200
    response.headers["Location"] = f"/v1/images/{image.id}"
    return ImagePublic.from_image(image)


@router.get(
    "/{image_id}", summary="Get an image record", responses=problem_responses(401, 404, 422)
)
def get_image(image_id: uuid.UUID, session: SessionDep, tenant: TenantDep) -> ImagePublic:
    image = repo.get_image(session, tenant_id=tenant.id, image_id=image_id)
    if image is None:
        raise not_found("image", image_id)
    return ImagePublic.from_image(image)
