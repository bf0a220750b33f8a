"""Policy training as a job: ``jobs.kind`` (``prune`` for every existing job, ``train_policy``) and, on
``policies``, ``status`` (``ready`` for every registered policy), ``job_id`` (the training job) and ``train``
(its options).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="prune"))
    with op.batch_alter_table("policies") as batch:
        batch.add_column(sa.Column("status", sa.String(length=16), nullable=False, server_default="ready"))
        batch.add_column(sa.Column("job_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("train", sa.JSON(), nullable=True))
        batch.create_foreign_key("fk_policies_job_id", "jobs", ["job_id"], ["id"], ondelete="SET NULL")
    op.create_index("ix_policies_job_id", "policies", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_policies_job_id", table_name="policies")
    with op.batch_alter_table("policies") as batch:
        batch.drop_constraint("fk_policies_job_id", type_="foreignkey")
        batch.drop_column("train")
        batch.drop_column("job_id")
        batch.drop_column("status")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("kind")
