"""The suite's errors: one hierarchy in one leaf module that imports nothing, so every layer (data, models,
commands) can raise them and the ``lits`` command can print them as one line without a traceback.

It sits in the bottom layer (``datamodules``) because everything else imports that layer anyway.
"""


class SuiteError(Exception):
    """An error the user can fix. The message is one line naming the file or setting and what to do."""


class DataError(SuiteError):
    """Bad input data: a missing, malformed or inconsistent file or folder of volumes."""


class CheckpointError(SuiteError):
    """A checkpoint that cannot be used here: not a suite checkpoint, or of another architecture or task."""


class ConfigError(SuiteError):
    """A bad setting: an experiment, study or sweep YAML, or a command-line argument out of range."""
