"""Alembic environment: the URL comes from `digin.service.db.migrate(url)`, `-x url=…`, or the
service settings; SQLite gets the same pragmas as the service's engine and batch mode for ALTERs."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from digin.service.db.engine import make_engine
from digin.service.db.models import Base

config = context.config
# the alembic CLI; digin.service.db.migrate leaves logging alone
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return str(url)
    from digin.service.settings import fresh_settings

    return fresh_settings().database_url


def run_migrations() -> None:
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations()
