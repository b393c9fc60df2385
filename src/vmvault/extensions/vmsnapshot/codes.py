"""Azure's VMSnapshot status codes, their names and VM health values (wire spec section 4).

The ``code`` of a status is the run result; ``vmHealthInfo.vmHealthStatusCode`` is the
ExtErrorCode, of which the first non-success value wins. Everything about codes lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GREEN, YELLOW, RED = 0, 128, 256

SUCCESS_APP_CONSISTENT = 0
SUCCESS = 1
ERROR = 2
ALREADY_PROCESSED = 3
TRANSITIONING = 4
ERROR_PARAMETER = 11
CERTIFICATE_NOT_FOUND = 16
SNAPSHOT_NO_NETWORK = 76
SNAPSHOT_LIMIT_REACHED = 85
FREEZE_FAILED = 121
FREEZE_TIMEOUT = 122
UNABLE_TO_OPEN_MOUNT = 123
SNAPSHOT_RATE_EXCEEDED = 173
PRE_SCRIPT_FAILED = 300
POST_SCRIPT_FAILED = 301
PRE_SCRIPT_NOT_FOUND = 302
POST_SCRIPT_NOT_FOUND = 303
PLUGIN_HOST_CONFIG_PARSING = 304
PLUGIN_CONFIG_PARSING = 305
PRE_SCRIPT_PERMISSION = 306
POST_SCRIPT_PERMISSION = 307
PRE_SCRIPT_TIMEOUT = 308
POST_SCRIPT_TIMEOUT = 309
PLUGIN_HOST_PRE_TIMEOUT = 310
PLUGIN_HOST_POST_TIMEOUT = 311
PLUGIN_HOST_CONFIG_NOT_FOUND = 313
PLUGIN_HOST_CONFIG_PERMISSION = 314
PLUGIN_CONFIG_NOT_FOUND = 316
PLUGIN_CONFIG_PERMISSION = 317
COMMAND_TOO_LATE = 402
SNAPSHOT_PARTIAL = 761

_TABLE: list[tuple[int, str, int]] = [
    (0, "success_appconsistent", GREEN),
    (1, "success", GREEN),
    (2, "error", GREEN),
    (3, "SuccessAlreadyProcessedInput", GREEN),
    (4, "ExtensionTempTerminalState", GREEN),
    (11, "error_parameter", YELLOW),
    (12, "error_12", GREEN),
    (13, "error_wrong_time", GREEN),
    (14, "error_same_taskid", GREEN),
    (15, "error_http_failure", RED),
    (16, "FailedHandlerGuestAgentCertificateNotFound", YELLOW),
    (17, "FailedInvalidDataDiskLunList", GREEN),
    (76, "FailedRetryableSnapshotFailedNoNetwork", RED),
    (85, "FailedSnapshotLimitReached", RED),
    (121, "FailedRetryableFsFreezeFailed", YELLOW),
    (122, "FailedRetryableFsFreezeTimeout", YELLOW),
    (123, "FailedRetryableUnableToOpenMount", YELLOW),
    (124, "FailedSafeFreezeBinaryNotFound", YELLOW),
    (173, "FailedRetryableSnapshotRateExceeded", GREEN),
    (300, "FailedPrepostPreScriptFailed", YELLOW),
    (301, "FailedPrepostPostScriptFailed", YELLOW),
    (302, "FailedPrepostPreScriptNotFound", YELLOW),
    (303, "FailedPrepostPostScriptNotFound", YELLOW),
    (304, "FailedPrepostPluginhostConfigParsing", YELLOW),
    (305, "FailedPrepostPluginConfigParsing", YELLOW),
    (306, "FailedPrepostPreScriptPermissionError", YELLOW),
    (307, "FailedPrepostPostScriptPermissionError", YELLOW),
    (308, "FailedPrepostPreScriptTimeout", YELLOW),
    (309, "FailedPrepostPostScriptTimeout", YELLOW),
    (310, "FailedPrepostPluginhostPreTimeout", YELLOW),
    (311, "FailedPrepostPluginhostPostTimeout", YELLOW),
    (312, "FailedPrepostCheckSumMismatch", YELLOW),
    (313, "FailedPrepostPluginhostConfigNotFound", YELLOW),
    (314, "FailedPrepostPluginhostConfigPermissionError", YELLOW),
    (315, "FailedPrepostPluginhostConfigOwnershipError", YELLOW),
    (316, "FailedPrepostPluginConfigNotFound", YELLOW),
    (317, "FailedPrepostPluginConfigPermissionError", YELLOW),
    (318, "FailedPrepostPluginConfigOwnershipError", YELLOW),
    (402, "FailedGuestAgentInvokedCommandTooLate", RED),
    (500, "FailedWorkloadPreError", YELLOW),
    (501, "FailedWorkloadConfParsingError", YELLOW),
    (502, "FailedWorkloadInvalidRole", YELLOW),
    (503, "FailedWorkloadInvalidWorkloadName", YELLOW),
    (504, "FailedWorkloadPostError", YELLOW),
    (505, "FailedWorkloadAuthorizationMissing", YELLOW),
    (506, "FailedWorkloadConnectionError", YELLOW),
    (507, "FailedWorkloadIPCDirectoryMissing", YELLOW),
    (508, "FailedWorkloadDatabaseStatusChanged", YELLOW),
    (509, "FailedWorkloadQuiescingError", YELLOW),
    (510, "FailedWorkloadQuiescingTimeout", YELLOW),
    (511, "FailedWorkloadDatabaseInNoArchiveLog", YELLOW),
    (512, "FailedWorkloadLogModeChanged", YELLOW),
    (556, "FailedHostSnapshotRemoteServerError", RED),
    (761, "FailedRetryableSnapshotFailedRestrictedNetwork", RED),
]
_NAMES = {code: name for code, name, _ in _TABLE}
_HEALTH = {code: health for code, _, health in _TABLE}

# snapshotConsistency values
CONSISTENCY_NONE, CONSISTENCY_FS, CONSISTENCY_APP, CONSISTENCY_CRASH = 0, 1, 2, 3
CONSISTENCY_NAMES = {0: "none", 1: "fileSystemConsistent", 2: "applicationConsistent",
                     3: "crashConsistent"}


def name(code: int) -> str:
    return _NAMES.get(code, f"code{code}")


def health(code: int) -> int:
    """The vmHealthState of an ExtErrorCode (red for a code Azure does not list)."""
    return _HEALTH.get(code, RED)


def status_suffix(code: int) -> str:
    """The text Azure appends to a status message: `` StatusCode.<Name>,``."""
    return f" StatusCode.{name(code)},"


def consistency(code: int, crash_consistent: bool = False) -> int:
    """snapshotConsistency derived from the run result, as Azure derives it."""
    if crash_consistent:
        return CONSISTENCY_CRASH
    if code == SUCCESS_APP_CONSISTENT:
        return CONSISTENCY_APP
    if code == SUCCESS:
        return CONSISTENCY_FS
    return CONSISTENCY_NONE


def is_success(code: int) -> bool:
    return code in (SUCCESS_APP_CONSISTENT, SUCCESS, ALREADY_PROCESSED)


@dataclass
class Outcome:
    """The run result, the ExtErrorCode (first non-success wins) and the messages so far."""

    code: int = SUCCESS
    ext_error: int = SUCCESS
    messages: list[str] = field(default_factory=list)

    def fail(self, code: int, message: str, ext_error: int | None = None) -> None:
        """Record a failure: the run result becomes ``code``; ExtErrorCode is set once."""
        self.code = code
        self.note_ext_error(code if ext_error is None else ext_error)
        self.messages.append(message)

    def note_ext_error(self, code: int) -> None:
        if self.ext_error == SUCCESS and not is_success(code):
            self.ext_error = code

    @property
    def failed(self) -> bool:
        return not is_success(self.code)

    @property
    def message(self) -> str:
        return "; ".join(self.messages)
