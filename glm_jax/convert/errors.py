"""The converters' user-facing error: one line that says what is wrong and where."""

from glm_jax.errors import UserError


class ConvertError(UserError):
    """Bad converter input (a missing file, a key or shape that disagrees); printed as one line."""
