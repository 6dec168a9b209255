"""The job's error kinds, each with the exit code of the public contract."""

import signal


class TransferError(Exception):
    """An error the user can fix; its message is one line naming what is wrong and where."""

    exit_code = 1


class ConfigError(TransferError):
    exit_code = 2


class DataError(TransferError):
    exit_code = 3


class TrainingError(TransferError):
    exit_code = 1


class Interrupted(TransferError):
    """The driver was told to stop (SIGTERM, SIGINT): the workers are stopped, the checkpoints kept; a rerun
    resumes. The exit code is the shell's for a process ended by that signal (143 for SIGTERM, 130 for SIGINT),
    so an orchestrator reads it as a cancellation, not a failure of the job."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum
