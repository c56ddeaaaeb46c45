"""The jobs table with leases.

Revision ID: 0001_jobs
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_jobs"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("progress", sa.Integer, nullable=False, server_default="0"),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("batch_key", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("owner", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
        sa.Column("started_at", sa.Float(precision=53)),
        sa.Column("completed_at", sa.Float(precision=53)),
        sa.Column("expires_at", sa.Float(precision=53)),
        sa.Column("error_code", sa.Text),
        sa.Column("error_message", sa.Text),
        sa.Column("timings", sa.Text),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", sa.Float(precision=53)),
    )
    op.create_index("jobs_status_created", "jobs", ["status", "created_at"])
    queued, running = sa.text("status='queued'"), sa.text("status='in_progress'")
    op.create_index("jobs_queued_batch", "jobs", ["batch_key", "created_at"], postgresql_where=queued)
    op.create_index("jobs_lease", "jobs", ["lease_expires_at"], postgresql_where=running)


def downgrade() -> None:
    op.drop_table("jobs")
