"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class MediffError(Exception):
    """An error caused by the user's input (missing file, corrupt data, bad option)."""
