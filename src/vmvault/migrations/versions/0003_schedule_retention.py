"""Scheduler slots on jobs, schedule cursor on protected items, retention on recovery points

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("slot", sa.String(length=200), nullable=True))
        batch.create_unique_constraint("uq_jobs_item_slot", ["item_id", "slot"])
    with op.batch_alter_table("protected_items") as batch:
        batch.add_column(sa.Column("schedule_cursor", sa.DateTime(), nullable=True))
    with op.batch_alter_table("recovery_points") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False,
                                   server_default="OnDemand"))
        batch.add_column(sa.Column("retention_tags", sa.JSON(), nullable=False,
                                   server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("recovery_points") as batch:
        batch.drop_column("retention_tags")
        batch.drop_column("kind")
    with op.batch_alter_table("protected_items") as batch:
        batch.drop_column("schedule_cursor")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_item_slot", type_="unique")
        batch.drop_column("slot")
