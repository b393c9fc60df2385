"""Backup policies (Microsoft.RecoveryServices/vaults/backupPolicies), Azure's JSON shape.

Each vault gets DefaultPolicy at creation: daily at a fixed time, 30 days of
daily retention, 2 days of instant-restore snapshots. Policy editing and the
scheduler belong to a later issue; this module holds the shape.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import Policy, ProtectedItem, Vault, utcnow
from vmvault.errors import not_found

DEFAULT_POLICY = "DefaultPolicy"


def default_policy_properties(now: dt.datetime | None = None) -> dict[str, Any]:
    run_time = (now or utcnow()).replace(hour=20, minute=30, second=0, microsecond=0)
    stamp = run_time.isoformat() + "+00:00"
    return {
        "backupManagementType": "AzureIaasVM",
        "instantRpRetentionRangeInDays": 2,
        "policyType": "V1",
        "schedulePolicy": {
            "schedulePolicyType": "SimpleSchedulePolicy",
            "scheduleRunFrequency": "Daily",
            "scheduleRunDays": None,
            "scheduleRunTimes": [stamp],
            "scheduleWeeklyFrequency": 0,
        },
        "retentionPolicy": {
            "retentionPolicyType": "LongTermRetentionPolicy",
            "dailySchedule": {
                "retentionTimes": [stamp],
                "retentionDuration": {"count": 30, "durationType": "Days"},
            },
            "weeklySchedule": None,
            "monthlySchedule": None,
            "yearlySchedule": None,
        },
        "timeZone": "UTC",
    }


def get(s: Session, vault: Vault, name: str) -> Policy:
    policy = s.scalar(select(Policy).where(Policy.vault_id == vault.id, Policy.name == name))
    if policy is None:
        raise not_found("policy", name)
    return policy


def list_for(s: Session, vault: Vault) -> list[Policy]:
    return list(s.scalars(select(Policy).where(Policy.vault_id == vault.id).order_by(Policy.name)))


def to_arm(s: Session, policy: Policy) -> dict[str, Any]:
    vault = policy.vault
    count = len(s.scalars(select(ProtectedItem.id)
                          .where(ProtectedItem.policy_id == policy.id)).all())
    return {
        "id": arm.resource_id(vault.group.name, "Microsoft.RecoveryServices", "vaults", vault.name,
                              "backupPolicies", policy.name),
        "name": policy.name,
        "resourceGroup": vault.group.name,
        "type": "Microsoft.RecoveryServices/vaults/backupPolicies",
        "properties": {**policy.properties, "protectedItemsCount": count},
    }


def instant_rp_days(policy: Policy | None) -> int:
    if policy is None:
        return 2
    return int(policy.properties.get("instantRpRetentionRangeInDays", 2))
