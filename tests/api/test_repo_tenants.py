"""Tenants, API keys (only hashes stored) and uploaded images."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from digin.service import repo
from digin.service.db import Tenant
from digin.service.security import generate_api_key, key_prefix


def test_tenants(session: Session):
    acme = repo.create_tenant(session, name="acme", webhook_secret="whsec_x")
    with pytest.raises(repo.TenantExists, match="'acme' exists"):
        repo.create_tenant(session, name="acme")
    assert repo.ensure_tenant(session, name="acme").id == acme.id
    assert repo.get_tenant(session, name="nobody") is None
    local = repo.local_tenant(session)
    assert local.name == repo.LOCAL_TENANT == "local"
    assert repo.local_tenant(session).id == local.id
    with pytest.raises(ValueError, match="tenant name 'Bad Name'"):
        repo.ensure_tenant(session, name="Bad Name")


def test_api_key_authenticates_its_tenant(session: Session):
    key, secret = repo.create_api_key(session, tenant_name="acme")  # creates the tenant
    session.commit()
    assert secret.startswith(f"dg_{key.prefix}_") and key_prefix(secret) == key.prefix
    tenant = repo.authenticate(session, secret=secret)
    assert isinstance(tenant, Tenant) and tenant.name == "acme"
    other_key, other_secret = repo.create_api_key(session, tenant_name="other")
    assert repo.authenticate(session, secret=other_secret).name == "other"
    assert [name for _, name in repo.list_api_keys(session)] == ["other", "acme"]
    assert [k.prefix for k, _ in repo.list_api_keys(session, tenant_name="acme")] == [key.prefix]


def test_only_the_hash_is_stored(session: Session):
    key, secret = repo.create_api_key(session, tenant_name="acme")
    session.commit()
    assert key.hash == hashlib.sha256(secret.encode()).hexdigest()
    rows = session.execute(text("SELECT * FROM api_keys")).all()
    stored = " ".join(str(value) for row in rows for value in row)
    assert secret.split("_", 2)[2] not in stored and key.prefix in stored


@pytest.mark.parametrize("kind", ["forged", "malformed", "empty"])
def test_wrong_secrets_are_refused(session: Session, kind: str):
    key, secret = repo.create_api_key(session, tenant_name="acme")
    forged = f"dg_{key.prefix}_{generate_api_key()[1].split('_', 2)[2]}"  # right prefix, wrong key
    assert key_prefix(forged) == key.prefix  # well-formed: the hash comparison refuses it
    wrong = {"forged": forged, "malformed": secret + "x", "empty": ""}[kind]
    assert repo.authenticate(session, secret=wrong) is None


def test_revoked_keys_stop_working(session: Session):
    key, secret = repo.create_api_key(session, tenant_name="acme")
    assert repo.revoke_api_key(session, prefix=key.prefix)
    session.commit()
    assert repo.authenticate(session, secret=secret) is None
    assert not repo.revoke_api_key(session, prefix=key.prefix)  # already revoked
    assert not repo.revoke_api_key(session, prefix="00000000")
    session.refresh(key)
    assert key.revoked_at is not None


def test_images_are_per_tenant_and_deduplicated(session: Session, tenant: Tenant):
    args = {"sha256": "ab" * 32, "format": "PNG", "width": 8, "height": 8, "size_bytes": 99,
            "storage_key": f"{tenant.id}/images/{'ab' * 32}.png"}  # fmt: skip
    image, created = repo.create_image(session, tenant_id=tenant.id, **args)
    again, created_again = repo.create_image(session, tenant_id=tenant.id, **args)
    session.commit()
    assert (created, created_again, again.id) == (True, False, image.id)
    assert repo.get_image(session, tenant_id=tenant.id, image_id=image.id).width == 8
    other = repo.ensure_tenant(session, name="other")
    assert repo.get_image(session, tenant_id=other.id, image_id=image.id) is None
    assert repo.get_image(session, tenant_id=tenant.id, image_id=uuid.uuid4()) is None
    theirs, created = repo.create_image(session, tenant_id=other.id, **args)
    assert created and theirs.id != image.id
