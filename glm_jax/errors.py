"""The one base class of errors a user can fix from the message alone.

Every command-line entry point prints a :class:`UserError` as one ``error: ...`` line on
stderr and exits with status 2; anything else is a bug and keeps its traceback. The
subclasses say which stage refused: configuration (``glm_jax.config.ConfigError``),
conversion (``glm_jax.convert.ConvertError``), checkpoints (:class:`CheckpointError`).
"""


class UserError(ValueError):
    """Bad input, phrased for the user in one line: what is wrong, where, and what is valid."""


class CheckpointError(UserError):
    """A checkpoint directory that is missing, incomplete or disagrees with its config."""
