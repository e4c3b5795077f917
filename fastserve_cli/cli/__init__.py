"""Typer commands: parse arguments, load the recipe, call the stage. Nothing else lives here.

Heavy libraries (torch, transformers, datasets) are imported by the stages, never at module level,
so `fastserve --help` stays instant.
"""

# The command modules register on `app` when imported, in the order `fastserve --help` lists them.
from fastserve_cli.cli import stages  # noqa: I001, F401
from fastserve_cli.cli import serving  # noqa: F401
from fastserve_cli.cli import pipeline  # noqa: F401
from fastserve_cli.cli.common import app, load_target, pick_target
from fastserve_cli.cli.main import main

__all__ = ["app", "load_target", "main", "pick_target"]
