"""Alembic migrations of the PostgreSQL job store (``microverse.pgjobs``)."""
