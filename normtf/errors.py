"""What can go wrong that the user can fix. The CLI prints the message as one line, no traceback."""

import signal

# What interrupts normtf, keeping finished epochs: Ctrl-C, `kill` or a container's stop, a closed terminal.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class NormtfError(Exception):
    """A problem the user can fix (exit code 1)."""


class UsageError(NormtfError):
    """A bad setting or argument (exit code 2, like a command-line usage error)."""


class DataError(NormtfError):
    """MNIST could not be found, fetched, verified or read."""


class CorruptFile(NormtfError):
    """A result file that is truncated or not what it should be."""


class Interrupted(NormtfError):
    """A STOP_SIGNALS signal during training: the epoch in progress is dropped, finished epochs are kept.
    `signum`: the signal, where one was received (not when a job's parent went away)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class NothingToDo(NormtfError):
    """Nothing left for this process to do, which is no failure (exit code 0): a worker whose chief
    already holds the finished run."""


class RunFailed(NormtfError):
    """A run ended failed (its loss became NaN or infinite); the others of the command still ran."""


class RunLocked(NormtfError):
    """Another normtf process holds the run's lock: it is training it now."""
