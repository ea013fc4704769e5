"""The converters' user-facing error: one line that says what is wrong and where."""


class ConvertError(ValueError):
    """Bad converter input (a missing file, a key or shape that disagrees); printed as one line."""
