"""Dataset errors: one line, naming the offending file."""


class DatasetError(ValueError):
    """An annotation file or image that cannot be used. The message names the file."""
