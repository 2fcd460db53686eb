"""Error types that name what was wrong, so a user can fix the input without reading code."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration field has a value the library cannot use.

    ``field`` is the dotted path as a user writes it on the command line
    (``config.train.learning_rate``), so the message doubles as the fix.
    """

    def __init__(self, field: str, value, expected: str):
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"{field}={value!r} is invalid: expected {expected}")


class DataError(ValueError):
    """Input data (a file, a line, an array) is not what the loader expects."""


class RunError(RuntimeError):
    """A run cannot go on safely: its workdir is in use by another process, its checkpoints
    are unreadable, or the disk is full. The message names the path and the way out."""


class DivergenceError(ConfigError, FloatingPointError):
    """Training diverged (a non-finite or exploding loss, or validation far worse than a
    constant predictor). Names ``config.train.learning_rate``, the value to lower."""

    def __init__(self, value, expected: str):
        super().__init__("config.train.learning_rate", value, expected)
