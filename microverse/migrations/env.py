"""Alembic environment of the PostgreSQL job store (``microverse.pgjobs.migrate`` runs it at start).

Replicas starting together take turns on an advisory lock, so each migration runs once.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

MIGRATION_LOCK = 0x4D56_4D47  # pg advisory lock key ("MVMG")


def run_migrations_online() -> None:
    config = context.config
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=None)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
            config.attributes["revision"] = context.get_context().get_current_revision()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()


run_migrations_online()
