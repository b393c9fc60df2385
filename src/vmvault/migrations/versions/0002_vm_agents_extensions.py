"""VM agents, extensions and the goal state's incarnation

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("virtual_machines") as batch:
        batch.add_column(sa.Column("incarnation", sa.Integer(), nullable=False,
                                   server_default="0"))
    op.create_table(
        "vm_agents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("certificate", sa.Text(), nullable=True),
        sa.Column("thumbprint", sa.String(length=40), nullable=True),
        sa.Column("version", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("registered", sa.DateTime(), nullable=True),
        sa.Column("last_heartbeat", sa.DateTime(), nullable=True),
        sa.Column("load", sa.JSON(), nullable=False),
        sa.Column("handlers", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["vm_id"], ["virtual_machines.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("vm_id"),
    )
    op.create_table(
        "vm_extensions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("publisher", sa.String(length=128), nullable=False),
        sa.Column("type", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("auto_upgrade_minor_version", sa.Boolean(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("protected_settings", sa.Text(), nullable=True),
        sa.Column("sequence_number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("provisioning_state", sa.String(length=32), nullable=False),
        sa.Column("instance_view", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["vm_id"], ["virtual_machines.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("vm_id", "name"),
    )


def downgrade() -> None:
    op.drop_table("vm_extensions")
    op.drop_table("vm_agents")
    with op.batch_alter_table("virtual_machines") as batch:
        batch.drop_column("incarnation")
