"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class MediffError(Exception):
    """An error caused by the user's input (missing file, corrupt data, bad option)."""


def one_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: a third-party exception as part of a one-line MediffError."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
