"""Every error the poller raises, in one tree.

```
PollerError
├── ConfigError                         start-up only; exit code 2
├── WireError                           reject → dead-letter queue, never requeue
├── BrokerError
│   ├── BrokerUnavailableError          retryable: reconnect with backoff
│   └── PublishNotConfirmedError        retryable: the job is requeued
└── JobError                            becomes a result with status=error; the job is acked
    ├── ExpiredError                    not run: not_after has passed
    ├── OutcomeUnknownError             not run again: redelivered and not idempotent
    ├── UnknownJobKindError             no driver for the kind in this process
    ├── CredentialNotFoundError
    ├── DeviceUnreachableError          retryable
    │   └── DeviceQuarantinedError      retryable: answered at once, the device is quarantined
    ├── DeviceTimeoutError              retryable (also a TimeoutError)
    ├── DeviceAuthError                 not retryable
    ├── HostKeyMismatchError            not retryable
    ├── SnmpError                       not retryable (an SNMP error-status)
    ├── DeviceCommandError              not retryable (a CLI error marker)
    ├── OutputTooLargeError             not retryable
    ├── PingNotPermittedError           not retryable (a configuration problem)
    └── InternalJobError                a bug, reported as a result on the last delivery
└── WorkerCrashedError                  a sandbox child died running a suspect job: requeued,
                                        reported as a result on the last delivery
```

`code` is what goes on the wire (`error.code` of a result); it never changes once released.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import JsonValue

__all__ = [
    "ERROR_CODES",
    "BrokerError",
    "BrokerUnavailableError",
    "ConfigError",
    "CredentialNotFoundError",
    "DeviceAuthError",
    "DeviceCommandError",
    "DeviceQuarantinedError",
    "DeviceTimeoutError",
    "DeviceUnreachableError",
    "ExpiredError",
    "HostKeyMismatchError",
    "InternalJobError",
    "JobError",
    "OutcomeUnknownError",
    "OutputTooLargeError",
    "PingNotPermittedError",
    "PollerError",
    "PublishNotConfirmedError",
    "SnmpError",
    "UnknownJobKindError",
    "WireError",
    "WorkerCrashedError",
]


class PollerError(Exception):
    """Base of every error raised by this package."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False


class ConfigError(PollerError):
    """A setting is missing or invalid; the message is one line naming the variable."""

    code = "config_error"


class WireError(PollerError):
    """A job message that cannot be accepted: undecodable, oversized, invalid or wrong version.

    `job_id` is set when the id could still be read, so that an error result can be published.
    The raw body is never part of the message: it may hold secrets.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_job",
        job_id: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = code
        self.job_id = job_id
        self.kind = kind


class BrokerError(PollerError):
    """Something went wrong talking to RabbitMQ."""

    retryable = True


class BrokerUnavailableError(BrokerError):
    """No broker connection could be made, or the connection was lost."""


class PublishNotConfirmedError(BrokerError):
    """The broker nacked a publish, returned it as unroutable, or the channel closed first."""


class JobError(PollerError):
    """A job failed in a way the core should hear about as a result.

    `data` holds whatever was gathered before the failure (partial walk, partial output).
    """

    code = "internal_error"

    def __init__(self, message: str, *, data: dict[str, JsonValue] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class ExpiredError(JobError):
    code = "expired"


class OutcomeUnknownError(JobError):
    code = "outcome_unknown"


class UnknownJobKindError(JobError):
    code = "unknown_kind"


class CredentialNotFoundError(JobError):
    code = "credential_not_found"


class DeviceUnreachableError(JobError):
    code = "device_unreachable"
    retryable = True


class DeviceQuarantinedError(DeviceUnreachableError):
    """Answered at once because the device is quarantined after repeated timeouts (DESIGN §5).

    Same code as `DeviceUnreachableError` on the wire; the runner tells it apart so that a
    refusal by the quarantine is not taken as a sign of life from the device.
    """


class DeviceTimeoutError(JobError, TimeoutError):
    code = "device_timeout"
    retryable = True


class DeviceAuthError(JobError):
    code = "auth_failed"


class HostKeyMismatchError(JobError):
    code = "host_key_mismatch"


class SnmpError(JobError):
    code = "snmp_error"


class DeviceCommandError(JobError):
    code = "command_error"


class OutputTooLargeError(JobError):
    code = "output_too_large"


class PingNotPermittedError(JobError):
    code = "ping_not_permitted"


class InternalJobError(JobError):
    code = "internal_error"


class WorkerCrashedError(PollerError):
    """The sandbox child running a suspect job died without a result (poller/sandbox.py).

    Not a `JobError`: like a bug, the job is requeued, and answered with this code only on
    the last delivery the queue allows (then dead-lettered).
    """

    code = "worker_crashed"


#: Every code a result can carry, with whether retrying the job can help.
ERROR_CODES: dict[str, bool] = {
    "invalid_job": False,
    "unsupported_version": False,
    **{
        cls.code: cls.retryable
        for cls in (
            UnknownJobKindError,
            ExpiredError,
            OutcomeUnknownError,
            CredentialNotFoundError,
            DeviceUnreachableError,
            DeviceTimeoutError,
            DeviceAuthError,
            HostKeyMismatchError,
            SnmpError,
            DeviceCommandError,
            OutputTooLargeError,
            PingNotPermittedError,
            InternalJobError,
            WorkerCrashedError,
        )
    },
}
