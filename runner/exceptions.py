"""Errors of the runner package, rooted by cause.

RunnerError
├── LeaseError        the node's lease cannot be established (no usable source)
├── PowerError        the CPU power benchmark failed or its cache is unusable
├── JobSpecError      a job spec is malformed (names the field)
├── JobRefused        the job does not fit the lease (fewer than min_events)
├── JournalError      the gather journal is corrupt or belongs to another plan
├── TaskError         a task's process could not be started (bad command, path)
├── ConfinementError  the job user is unknown or cannot reach the work directory
├── UnknownJob        no job with that id in the service's queue
├── QueueBusy         another live pilot or job service owns the queue directory
└── RunnerConfigError a ``[runner]`` key or a runner option has a bad value (names it)

Warnings about individual lease sources (a missing or malformed MJF file) are
not errors: they are collected in ``Lease.warnings`` and the value falls back
to the next source.
"""


class RunnerError(Exception):
    """Root of every error raised by ``runner``."""


class LeaseError(RunnerError):
    """No source gives a usable value for a field the lease needs."""


class PowerError(RunnerError):
    """The CPU power benchmark could not produce a score."""


class JobSpecError(RunnerError):
    """A job spec is malformed; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"job spec field {field!r}: {message}")
        self.field = field


class JobRefused(RunnerError):
    """The job would get fewer than ``min_events``; nothing was run."""

    def __init__(self, message: str, events: int, min_events: int) -> None:
        super().__init__(message)
        self.events = events
        self.min_events = min_events


class JournalError(RunnerError):
    """The gather journal cannot be trusted for this plan."""


class TaskError(RunnerError):
    """A task's command could not be started."""


class ConfinementError(RunnerError):
    """Tasks cannot be confined as configured (unknown job user, unreachable directory)."""


class UnknownJob(RunnerError):
    """The job service has no job with this id."""


class QueueBusy(RunnerError):
    """Another live process (pilot or job service) owns the queue directory."""


class RunnerConfigError(RunnerError):
    """A ``[runner]`` config key or a runner command option is unusable; the
    message names the key and what it accepts."""
