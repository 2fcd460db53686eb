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
