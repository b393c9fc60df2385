"""The error catalog: every error a user can meet, with its code, message and action.

One entry per situation. Codes follow Azure Backup's where Azure's are known
(see ../shared/spec/troubleshooting.md), so that a search for an Azure code
finds the same meaning here. Raise :class:`VmvaultError` with an entry; the CLI
and the REST API render it the same way (``code``, ``message``, ``action``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorEntry:
    code: str
    message: str  # may hold {placeholders} filled from the raise site
    action: str
    http_status: int = 400
    row: str = ""  # the troubleshooting row (B8, R6, ...) this entry answers, if any
    severity: str = "error"  # or "warning": recorded on a job that goes on


CATALOG: dict[str, ErrorEntry] = {}


def _entry(code: str, message: str, action: str, http_status: int = 400,
           row: str = "", severity: str = "error") -> ErrorEntry:
    entry = ErrorEntry(code, message, action, http_status, row, severity)
    CATALOG[code] = entry
    return entry


# --- generic ---------------------------------------------------------------
RESOURCE_NOT_FOUND = _entry(
    "ResourceNotFound",
    "The {kind} '{name}' was not found.",
    "Check the name and the resource group; list what exists with the matching 'list' command.",
    404,
)
RESOURCE_EXISTS = _entry(
    "ResourceAlreadyExists",
    "The {kind} '{name}' already exists.",
    "Choose another name, or delete the existing one first.",
    409,
)
INVALID_ARGUMENT = _entry(
    "InvalidArgumentValue",
    "Invalid value for {field}: {reason}",
    "Correct the value and run the command again (see --help).",
    400,
)
RESOURCE_IN_USE = _entry(
    "ResourceInUse",
    "The {kind} '{name}' is still in use: {reason}",
    "Remove what uses it first, then retry.",
    409,
)
SERVER_UNREACHABLE = _entry(
    "ServerUnreachable",
    "The vmvault server at {url} is not reachable.",
    "Start the local stack with 'vmvault up' (see 'vmvault status').",
    503,
)
INTERNAL_ERROR = _entry(
    "InternalError",
    "An internal error occurred: {reason}",
    "Retry; if it happens again, report it with the server log ($VMVAULT_HOME/logs/server.log).",
    500,
)
NOT_ROOT = _entry(
    "UserErrorNotRoot",
    "{what} needs root (loop devices, mounts, fsfreeze).",
    "Run vmvault as root, or go on without it: disks stay unmounted, backups are crash-consistent.",
    400,
)

# --- fabric ------------------------------------------------------------------
VM_NOT_FOUND = _entry(
    "UserErrorVmNotFound",
    "The VM '{name}' no longer exists.",
    "Stop protection and retain data, or recreate the VM with the same name in the same "
    "resource group.",
    404,
    row="B1, B7",
)
VM_NOT_IN_DESIRABLE_STATE = _entry(
    "UserErrorVmNotInDesirableState",
    "The VM '{name}' is in a state that does not allow this operation ({state}).",
    "Wait until the VM's state change completes, then retry.",
    409,
    row="B12",
)
VM_PROVISIONING_FAILED = _entry(
    "UserErrorVmProvisioningStateFailed",
    "The VM '{name}' is in a failed provisioning state.",
    "Check the extension list, remove the failed extension and restart the VM; restart the "
    "VM agent if all extensions are fine.",
    409,
    row="B3",
)
# --- VM agent and extensions (the guest path) -----------------------------------
AGENT_UNREACHABLE = _entry(
    "UserErrorGuestAgentStatusUnavailable",
    "The VM agent of '{name}' is unreachable: {reason}",
    "Check the VM's network, and that the VM agent is running and up to date "
    "('vmvault vm agent show'); restart it with 'vmvault vm agent restart'.",
    409,
    row="B2",
)
AGENT_NOT_RESPONDING = _entry(
    "GuestAgentSnapshotTaskStatusError",
    "The VM agent of '{name}' is not responding: {reason}",
    "Restart or reinstall the VM agent ('vmvault vm agent restart'), then retry the backup.",
    409,
    row="B5",
)
AGENT_TOO_OLD = _entry(
    "UserErrorGuestAgentVersionNotSupported",
    "The VM agent of '{name}' is version {version}, older than the minimum {minimum}; "
    "the extension operation was not started.",
    "Update the VM agent to version {minimum} or later, then retry.",
    409,
    row="B6",
)
AGENT_NOT_INSTALLED = _entry(
    "UserErrorGuestAgentNotInstalled",
    "Installing the backup extension failed: the VM '{name}' has no VM agent.",
    "Install the VM agent ('vmvault vm agent install'), then retry the backup.",
    409,
    row="B11",
)
FS_FREEZE_FAILED = _entry(
    "UserErrorFsFreezeFailed",
    "Freezing one or more mount points of the VM '{name}' failed: {reason}",
    "Check each file system's state (tune2fs -l for ext4, xfs_info for xfs); unmount and fsck "
    "the unclean ones, and make sure no other tool holds a mount frozen; then retry.",
    409,
    row="B14",
)
SNAPSHOT_NO_NETWORK = _entry(
    "ExtensionSnapshotFailedNoNetwork",
    "The snapshot extension could not reach the storage of the VM '{name}': {reason}",
    "Allow the VM to reach the Blob endpoint (network, proxy settings of the agent), then retry.",
    409,
    row="S1",
)
SNAPSHOT_AUTH_FAILED = _entry(
    "ExtensionSnapshotFailedAuthorization",
    "The storage refused the snapshot extension's SAS for the VM '{name}': {reason}",
    "Check that the clocks of the VM and of the vmvault server agree (an expired SAS), then "
    "retry the backup.",
    409,
    row="S1",
)
GUEST_OVERLOADED = _entry(
    "UserErrorGuestResourcesOverloaded",
    "The snapshot of the VM '{name}' was queued and timed out: the guest's {resource} use is "
    "above {limit}% ({value}%).",
    "Take an on-demand backup when the VM is less busy, or move the policy's time to a quieter "
    "hour.",
    409,
    row="S4",
)
EXTENSION_FAILED = _entry(
    "ExtensionOperationFailed",
    "The extension {extension} on the VM '{name}' failed: {reason}",
    "Read the extension's status ('vmvault vm extension show') and log; fix what it names and "
    "retry.",
    409,
)
EXTENSION_SETTINGS_INVALID = _entry(
    "UserErrorExtensionSettingsInvalid",
    "The settings of extension {extension} are invalid: {reason}",
    "Correct the field named and set the extension again.",
    400,
)
AGENT_AUTH_FAILED = _entry(
    "AgentAuthenticationFailed",
    "The VM agent's request was refused: {reason}",
    "Restart the agent so that it registers again ('vmvault vm agent restart').",
    401,
)

STORAGE_ACCOUNT_NOT_ONLINE = _entry(
    "UserErrorStorageAccountNotOnline",
    "The storage account '{name}' is not online.",
    "Check that the storage account is online, or choose another one.",
    409,
    row="R8",
)
STORAGE_ACCOUNT_FULL = _entry(
    "UserErrorStorageAccountQuotaExceeded",
    "The storage account '{name}' does not have room for {needed} bytes ({free} free).",
    "Free space in the storage account, raise its capacity, or choose another one.",
    409,
)
STORAGE_REGION_MISMATCH = _entry(
    "UserErrorStorageAccountLocationMismatch",
    "The storage account '{name}' is in '{account_location}', the vault in '{vault_location}'.",
    "Choose a storage account in the vault's region.",
    400,
    row="R6",
)
STORAGE_TYPE_NOT_SUPPORTED = _entry(
    "UserErrorStorageAccountTypeNotSupported",
    "The storage account '{name}' has type {sku}, which restore does not support.",
    "Choose a standard storage account with locally or geo-redundant replication "
    "(Standard_LRS or Standard_GRS).",
    400,
    row="R7",
)

# --- backup ------------------------------------------------------------------
OPERATION_IN_PROGRESS = _entry(
    "UserErrorBackupOperationInProgress",
    "Another operation is in progress on '{name}' (job {job_id}).",
    "Wait for the running job to finish, then retry.",
    409,
    row="B8",
)
NOT_PROTECTED = _entry(
    "UserErrorItemNotProtected",
    "The VM '{name}' is not protected by vault '{vault}'.",
    "Enable protection first: vmvault backup protection enable-for-vm.",
    404,
)
ALREADY_PROTECTED = _entry(
    "UserErrorVmAlreadyProtected",
    "The VM '{name}' is already protected by vault '{vault}'.",
    "Use the existing protected item, or stop its protection first.",
    409,
)
BACKUP_INTERNAL = _entry(
    "BackUpOperationFailed",
    "The backup failed with an internal error: {reason}",
    "Retry in a few minutes.",
    500,
    row="B10",
)
BACKUP_TRANSFER_TIMEOUT = _entry(
    "CopyingVHDsFromBackUpVaultTakingLongTime",
    "Copying the disks of '{name}' to the vault did not finish within {limit} ({reason}).",
    "This is usually transient (storage or throughput limits): retry in a few minutes; if it "
    "keeps happening, move the policy's time to a quieter hour.",
    504,
    row="B9",
)
PREMIUM_STORAGE_QUOTA = _entry(
    "UserErrorBCMPremiumStorageQuotaError",
    "The premium storage account '{name}' has {free} bytes free, less than the {needed} bytes "
    "of disk data the snapshot may have to keep.",
    "Free space in the storage account (or raise its capacity) so that it has room for the "
    "premium disks' data, then retry.",
    409,
    row="B4",
)
KEY_NOT_AVAILABLE = _entry(
    "UserErrorKeyvaultPermissionsNotConfigured",
    "The key material of vault '{name}' is not available to the backup service: {reason}",
    "Give the service its key back: restore the vault's key file at {path} (from your key "
    "backup), or open the vault with its password; then retry.",
    403,
    row="B13",
)
BACKUP_TOO_LONG = _entry(
    "BackupTakingLongerThanExpected",
    "The backup of '{name}' has been running for {elapsed}, longer than {limit}.",
    "Best practice: keep a VM's backup under 12 hours - spread the policies of busy VMs over "
    "the day, avoid large changes just before the backup window, and check the guest's load.",
    200,
    severity="warning",
)
RESTORE_TOO_LONG = _entry(
    "RestoreTakingLongerThanExpected",
    "The restore of '{name}' has been running for {elapsed}, longer than {limit}.",
    "Best practice: keep restores under 6 hours - restore to a storage account in the vault's "
    "region that is not busy, and restore from the snapshot tier (instant) when the point is "
    "still there.",
    200,
    severity="warning",
)
PROTECTION_STOPPED = _entry(
    "UserErrorProtectionStopped",
    "Protection of '{name}' is stopped; no backup runs for it.",
    "Resume protection with 'vmvault backup protection resume', then retry.",
    409,
)
RESTORE_FAILED = _entry(
    "UserErrorRestoreFailed",
    "The restore failed: {reason}",
    "Check the target storage account, then retry; if the recovery point is damaged, "
    "choose another.",
    500,
)

# --- vault -------------------------------------------------------------------
VAULT_WRONG_PASSWORD = _entry(
    "UserErrorVaultKeyIncorrect",
    "The password or key file does not open vault '{name}'.",
    "Give the password or key file the vault was created with.",
    403,
)
VAULT_CORRUPT = _entry(
    "UserErrorVaultDataCorrupted",
    "Vault data is damaged: {reason}",
    "Run 'vmvault backup vault check --read-data' to see what is affected; restore from "
    "another recovery point.",
    500,
)
VAULT_FORMAT_UNSUPPORTED = _entry(
    "UserErrorVaultFormatUnsupported",
    "The vault at {path} has format version {version}, which this vmvault does not read.",
    "Use a vmvault release that supports this format version.",
    400,
)
VAULT_NOT_EMPTY = _entry(
    "UserErrorVaultNotEmpty",
    "The vault '{name}' still holds protected items or recovery points.",
    "Stop protection with --delete-backup-data for each item first.",
    409,
)
VAULT_LOCKED = _entry(
    "UserErrorVaultLocked",
    "The vault at {path} is locked by {holder} ({operation}, since {since}).",
    "Wait for that operation to finish and retry; a lock whose process is gone is removed "
    "automatically.",
    409,
)


# --- the scheduler ---------------------------------------------------------------
BACKUPS_QUEUED = _entry(
    "ScheduledBackupsQueued",
    "{count} backups of resource group '{group}' were due at {time}; more than {limit} at once, "
    "so this one waited for others to finish.",
    "Spread the start times of the policies of one resource group by at least an hour.",
    200,
    row="S3",
    severity="warning",
)
CATCH_UP = _entry(
    "ScheduledBackupCatchUp",
    "The scheduled backup of {missed} was missed (the vmvault server was not running then, or "
    "its clock jumped past it); this job is its catch-up run.",
    "Keep the server running (vmvault up) across the policies' backup times.",
    200,
    severity="warning",
)

# --- jobs (rows J1-J4) ---------------------------------------------------------------------
JOB_CANCEL_NOT_SUPPORTED = _entry(
    "UserErrorJobCancellationNotSupported",
    "Cancellation is not supported for this job type ({operation}).",
    "Wait until the job completes.",
    400,
    row="J1",
)
JOB_NOT_CANCELLABLE = _entry(
    "UserErrorJobNotInCancellableState",
    "The job is not in a cancellable state ({state}).",
    "Wait until the job completes.",
    409,
    row="J2",
)
JOB_NOT_IN_PROGRESS = _entry(
    "UserErrorJobNotInProgress",
    "Cancellation is supported only for jobs in progress; this job is {status}.",
    "Nothing to cancel: look at the job's result with 'vmvault backup job show'.",
    409,
    row="J3",
)
JOB_CANCEL_FAILED = _entry(
    "UserErrorJobCancellationFailed",
    "Failed to cancel the job: {reason}",
    "Wait until the job completes.",
    409,
    row="J4",
)
JOB_CANCELLED = _entry(
    "JobCancelledByUser",
    "The job was cancelled at the user's request ({where}); nothing it started was kept.",
    "Start the operation again when you need it.",
    200,
    severity="warning",
)


def _fill(text: str, fields: dict[str, Any]) -> str:
    try:
        return text.format(**fields)
    except (KeyError, IndexError):
        return text


class VmvaultError(Exception):
    """A catalog error with its placeholders filled in."""

    def __init__(self, entry: ErrorEntry, **fields: Any) -> None:
        self.entry = entry
        self.fields = fields
        self.message = _fill(entry.message, fields)
        self._action = _fill(entry.action, fields)
        super().__init__(f"({entry.code}) {self.message}")

    @property
    def code(self) -> str:
        return self.entry.code

    @property
    def action(self) -> str:
        return self._action

    @property
    def http_status(self) -> int:
        return self.entry.http_status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "action": self.action}

    @classmethod
    def from_dict(cls, data: dict[str, Any], http_status: int | None = None) -> VmvaultError:
        """Rebuild an error received from the REST API (or a job's error details)."""
        code = str(data.get("code", "InternalError"))
        known = CATALOG.get(code)
        entry = ErrorEntry(
            code,
            str(data.get("message", "")),
            str(data.get("action") or (known.action if known else "")),
            http_status or (known.http_status if known else 500),
            known.row if known else "",
        )
        return cls(entry)


def not_found(kind: str, name: str) -> VmvaultError:
    return VmvaultError(RESOURCE_NOT_FOUND, kind=kind, name=name)


def invalid(field: str, reason: str) -> VmvaultError:
    return VmvaultError(INVALID_ARGUMENT, field=field, reason=reason)


# --- storage (disk store and Blob endpoint; codes are Azure Blob's own) -------
BLOB_SNAPSHOTS_PRESENT = _entry(
    "SnapshotsPresent",
    "This operation is not permitted because the blob '{name}' has snapshots.",
    "Delete the snapshots first, or delete the blob with its snapshots "
    "(x-ms-delete-snapshots: include).",
    409,
)
BLOB_INVALID_TYPE = _entry(
    "InvalidBlobType",
    "The blob type is invalid for this operation: '{name}' is a {blob_type}.",
    "Use an operation that fits the blob's type (page operations need a page blob).",
    409,
)
BLOB_INVALID_PAGE_RANGE = _entry(
    "InvalidPageRange",
    "The page range specified is invalid: {reason}",
    "Give a range aligned to 512 bytes that lies within the blob.",
    416,
)
BLOB_INVALID_BLOCK_LIST = _entry(
    "InvalidBlockList",
    "The specified block list is invalid.",
    "Stage every block of the list (Put Block) before committing it.",
    400,
)


@dataclass(frozen=True)
class NotApplicable:
    """A row of the troubleshooting guide that cannot happen in vmvault, and why."""

    row: str
    situation: str
    reason: str


_WINDOWS = "Windows only: vmvault protects Linux VMs (no VSS, COM+, registry or .NET)."
_NEW_VM = ("Restoring as a new VM (network, DNS, IP configuration of the target): vmvault "
           "restores disks (RestoreDisks) and lab VMs have no virtual network, DNS name, "
           "reserved IP or endpoints; create the VM from the restored disks, as this row's "
           "own advice says.")
NOT_APPLICABLE: list[NotApplicable] = [
    NotApplicable("W1", "Extension install fails: COM+ cannot talk to the Microsoft "
                  "Distributed Transaction Coordinator", _WINDOWS),
    NotApplicable("W2", "Snapshot fails: the drive is locked by BitLocker (VSS error)",
                  _WINDOWS),
    NotApplicable("W3", "Snapshot fails: VSS writers in a bad state", _WINDOWS),
    NotApplicable("W4", "Snapshot fails: configuration parse error (MachineKeys permissions)",
                  _WINDOWS),
    NotApplicable("W5", "Snapshot fails: COM+ error", _WINDOWS),
    NotApplicable("W6", "Snapshot fails: no secure channel (SchUseStrongCrypto for .NET)",
                  _WINDOWS),
    NotApplicable("W7", "Snapshot fails: Visual C++ 2012 redistributable install failed",
                  _WINDOWS),
    NotApplicable("R1", "Cloud internal error (special DNS or reserved IP at the target)",
                  _NEW_VM),
    NotApplicable("R2", "The chosen DNS name is already in use", _NEW_VM),
    NotApplicable("R3", "The given virtual network configuration is invalid", _NEW_VM),
    NotApplicable("R4", "The target uses a reserved IP that does not match the VM", _NEW_VM),
    NotApplicable("R5", "The target reached its input endpoint limit", _NEW_VM),
    NotApplicable("R9", "The resource group quota is reached (restore creating a VM and its "
                  "resources)", _NEW_VM),
    NotApplicable("R10", "The selected subnet does not exist", _NEW_VM),
    NotApplicable("R11", "The backup service lacks permission to create the VM's resources",
                  _NEW_VM + " vmvault has no role-based access control (one local operator)."),
]


def lookup(key: str) -> list[ErrorEntry | NotApplicable]:
    """Entries by code (case-insensitive) or by troubleshooting row (B8, J2, S3, R7, ...)."""
    wanted = key.strip().lower()
    found: list[ErrorEntry | NotApplicable] = [
        e for e in CATALOG.values()
        if e.code.lower() == wanted or wanted in [r.strip().lower() for r in e.row.split(",")
                                                  if r.strip()]]
    found += [n for n in NOT_APPLICABLE if n.row.lower() == wanted]
    return found


def catalog_markdown() -> str:
    """docs/errors.md, generated from the catalog (python -m vmvault.errors > docs/errors.md)."""
    lines = [
        "# vmvault error catalog",
        "",
        "Generated from `src/vmvault/errors.py` by `python -m vmvault.errors > docs/errors.md`;",
        "a test fails when this file and the catalog disagree. Codes follow Azure Backup's where",
        "Azure's are known; *Row* is the row of the troubleshooting guide the entry answers.",
        "",
        "| Code | HTTP | Row | Message | Recommended action |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for entry in sorted(CATALOG.values(), key=lambda e: (e.row or "~", e.code)):
        status = str(entry.http_status) if entry.severity == "error" else entry.severity
        cells = [entry.code, status, entry.row or "",
                 entry.message.replace("|", "\\|"), entry.action.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Rows that do not apply to vmvault",
        "",
        "The guide's rows below cannot happen here; `vmvault backup troubleshoot --code ROW`",
        "says the same.",
        "",
        "| Row | Situation | Why not here |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {n.row} | {n.situation} | {n.reason} |" for n in NOT_APPLICABLE]
    lines += [
        "",
        "## Server settings behind some of these errors",
        "",
        "Environment variables of the server (`vmvault up` passes its environment on).",
        "",
        "| Variable | Default | Meaning |",
        "| --- | ---: | --- |",
    ]
    from dataclasses import fields

    from vmvault.config import ServiceSettings

    lines += [f"| `{f.metadata['env']}` | {f.default:g} | {f.metadata['doc']} |"
              for f in fields(ServiceSettings)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(catalog_markdown(), end="")
