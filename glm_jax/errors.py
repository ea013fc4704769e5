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


class UnreadableCheckpoint(CheckpointError):
    """Checkpoint files that cannot be read (torn, truncated, missing): a reader of a
    training workdir may fall back to an older checkpoint."""


def one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one line for a message: its innermost cause (which usually names
    the file), type and first sentence, cut at a word, without tensorstore's spec dumps."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
