"""User-facing errors.

Anything raised as a :class:`KDistillError` is a user mistake (bad config, missing file, bad
row): the CLI prints its message as one line and exits with status 2. Everything else is a bug
and keeps its traceback.
"""


class KDistillError(Exception):
    """A problem with the user's input; the message is shown as one line."""


class ConfigError(KDistillError):
    """A config key is unknown, missing, or has the wrong type or value."""


class DataError(KDistillError):
    """A data file is missing, empty, or has a bad row (message names file and line)."""


class ModelError(KDistillError):
    """A model cannot be loaded, or teacher and student are incompatible."""


class TrainingError(KDistillError):
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be written); what was saved is kept."""
