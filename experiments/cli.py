"""What every command-line entry point does first."""

from __future__ import annotations

from absl import app, flags, logging


def start(argv: list[str]) -> None:
    """Refuse stray positional arguments, and log at WARNING unless ``--verbosity`` was given:
    orbax, jax and TFDS log every checkpoint and build step at INFO."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
