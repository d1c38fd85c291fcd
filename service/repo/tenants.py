"""Tenants, their API keys (docs/architecture.md §9.6) and uploaded start images."""

from __future__ import annotations

import re
import uuid
from typing import Any

from sqlalchemy import Insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from digin.service.db.models import ApiKey, Image, Tenant, utcnow
from digin.service.security import generate_api_key, hash_api_key, key_prefix, verify_api_key

LOCAL_TENANT = "local"  # embedded mode's tenant when auth is off
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DUMMY_HASH = hash_api_key("dg_00000000_" + "0" * 43)  # checked against when no key matches


def insert_ignore(session: Session, model: type[Any], conflict: list[str]) -> Insert:
    """INSERT … ON CONFLICT (conflict) DO NOTHING, on PostgreSQL and SQLite."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(model).on_conflict_do_nothing(index_elements=conflict)  # type: ignore[no-any-return]


def check_tenant_name(name: str) -> str:
    if not TENANT_NAME.match(name):
        raise ValueError(
            f"tenant name {name!r}: 1 to 64 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def get_tenant(session: Session, *, name: str) -> Tenant | None:
    return session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()


class TenantExists(ValueError):
    pass


def create_tenant(session: Session, *, name: str, webhook_secret: str | None = None) -> Tenant:
    """A new tenant; raises TenantExists if the name is taken."""
    check_tenant_name(name)
    values = {
        "id": uuid.uuid4(),
        "name": name,
        "created_at": utcnow(),
        "webhook_secret": webhook_secret,
    }
    stmt = insert_ignore(session, Tenant, ["name"]).values(**values).returning(Tenant.id)
    tenant_id = session.scalar(stmt)
    if tenant_id is None:
        raise TenantExists(f"tenant {name!r} exists already")
    return session.get_one(Tenant, tenant_id)


def ensure_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant called `name`, created if missing (safe when two processes race; no write
    when it exists, so reads stay reads)."""
    tenant = get_tenant(session, name=check_tenant_name(name))
    if tenant is not None:
        return tenant
    values = {"id": uuid.uuid4(), "name": name, "created_at": utcnow()}
    session.execute(insert_ignore(session, Tenant, ["name"]).values(**values))
    tenant = get_tenant(session, name=name)
    assert tenant is not None
    return tenant


def local_tenant(session: Session) -> Tenant:
    """Embedded mode's tenant (`local`), used for every request when auth is off."""
    return ensure_tenant(session, name=LOCAL_TENANT)


# --- API keys ----------------------------------------------------------------------------------
def create_api_key(session: Session, *, tenant_name: str) -> tuple[ApiKey, str]:
    """A new key for the tenant (created if missing): (record, secret). The secret is shown
    once; the database keeps only its prefix and SHA-256."""
    tenant = ensure_tenant(session, name=tenant_name)
    for _ in range(5):  # an 8-hex prefix collides rarely; draw again if it does
        prefix, secret = generate_api_key()
        values = {
            "id": uuid.uuid4(),
            "tenant_id": tenant.id,
            "prefix": prefix,
            "hash": hash_api_key(secret),
            "created_at": utcnow(),
        }
        stmt = insert_ignore(session, ApiKey, ["prefix"]).values(**values).returning(ApiKey.id)
        key_id = session.scalar(stmt)
        if key_id is not None:
            return session.get_one(ApiKey, key_id), secret
    raise RuntimeError("could not draw an unused API key prefix")


def list_api_keys(session: Session, *, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """(key, tenant name) pairs, newest first; secrets are not kept and cannot be listed."""
    stmt = select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id)
    if tenant_name is not None:
        stmt = stmt.where(Tenant.name == tenant_name)
    rows = session.execute(stmt.order_by(ApiKey.created_at.desc()))
    return [(key, name) for key, name in rows]


def revoke_api_key(session: Session, *, prefix: str) -> bool:
    """Revoke the key with this prefix; False if there is no such active key."""
    stmt = (
        update(ApiKey)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .returning(ApiKey.id)
        .execution_options(synchronize_session=False)
    )
    return session.scalar(stmt) is not None


def authenticate(session: Session, *, secret: str) -> Tenant | None:
    """The tenant of an active key `secret`, else None (compared in constant time)."""
    prefix = key_prefix(secret)
    row = None
    if prefix is not None:
        row = session.execute(
            select(ApiKey.hash, Tenant)
            .join(Tenant, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        ).one_or_none()
    if row is None:
        verify_api_key(secret, DUMMY_HASH)  # the same work as for a known prefix
        return None
    stored_hash, tenant = row
    return tenant if verify_api_key(secret, stored_hash) else None


# --- images ------------------------------------------------------------------------------------
def create_image(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    sha256: str,
    format: str,
    width: int,
    height: int,
    size_bytes: int,
    storage_key: str,
) -> tuple[Image, bool]:
    """Record an uploaded image; (image, created). The same bytes uploaded again by the
    tenant return the existing record (created False)."""
    values = {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "sha256": sha256,
        "format": format,
        "width": width,
        "height": height,
        "size_bytes": size_bytes,
        "storage_key": storage_key,
        "created_at": utcnow(),
    }
    stmt = insert_ignore(session, Image, ["tenant_id", "sha256"]).values(**values)
    created = session.scalar(stmt.returning(Image.id)) is not None
    image = session.scalars(
        select(Image).where(Image.tenant_id == tenant_id, Image.sha256 == sha256)
    ).one()
    return image, created


def owned_image_ids(
    session: Session, *, tenant_id: uuid.UUID, image_ids: list[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of `image_ids` are the tenant's uploads (one query per 1000 ids)."""
    owned: set[uuid.UUID] = set()
    for start in range(0, len(image_ids), 1000):
        chunk = image_ids[start : start + 1000]
        owned.update(
            session.scalars(
                select(Image.id).where(Image.tenant_id == tenant_id, Image.id.in_(chunk))
            )
        )
    return owned


def get_image(session: Session, *, tenant_id: uuid.UUID, image_id: uuid.UUID) -> Image | None:
    """The tenant's image, or None (also for another tenant's)."""
    return session.scalars(
        select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id)
    ).one_or_none()
