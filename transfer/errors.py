"""The job's error kinds, each with the exit code of the public contract."""


class TransferError(Exception):
    """An error the user can fix; its message is one line naming what is wrong and where."""

    exit_code = 1


class ConfigError(TransferError):
    exit_code = 2


class DataError(TransferError):
    exit_code = 3


class TrainingError(TransferError):
    exit_code = 1
