"""The ``mediff`` typer app, its console and the entry point that turns errors into one line.

Every user-input problem surfaces as a ``MediffError``: one line on stderr, exit code 2, never a
traceback (``--debug`` shows it).
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from mediff import __version__
from mediff.errors import MediffError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Diffusion models for medical imaging: train, sample, reconstruct, evaluate, audit.")
console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"mediff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def main() -> None:
    """Entry point: run the app, turning user errors into one-line messages.

    Typer's standalone mode already prints usage errors in one line and exits 2 via SystemExit.
    """
    try:
        app()
    except MediffError as exc:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback for users
        if _state["debug"]:
            raise
        console.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for details)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)
