"""The ``mediff`` command line (typer + rich): ``app`` holds the app and the entry point, each command
module registers its commands on import."""

from mediff.cli import audit, commands, demo, evaluate, reconstruct  # noqa: F401 - registers the commands
from mediff.cli.app import app, main

__all__ = ["app", "main"]
