"""What every command shares: the Typer app, common options, finding the run, printing results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from fastserve_cli import __version__
from fastserve_cli.core.errors import UserError

app = typer.Typer(
    name="fastserve",
    help="Raw text to a served causal LM: preprocess, train, optimize, export, serve, batch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
recipe_app = typer.Typer(help="Validate recipes and print their schema.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

STATE = {"debug": os.environ.get("FASTSERVE_DEBUG") == "1"}

SetOption = typer.Option(None, "--set", help="Override a recipe key, e.g. --set train.max_steps=100 (repeatable).")
JsonOption = typer.Option(False, "--json", help="Print the result as JSON on stdout (for CI).")
TargetArgument = typer.Argument(
    None,
    help="A recipe YAML or a run directory; default: $FASTSERVE_RUN, else the run the last stage wrote from here "
    "(runs/.last), else the only run under ./runs.",
    show_default=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fastserve {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """fastserve: one command per pipeline stage; `fastserve run` runs them all."""
    if debug:
        STATE["debug"] = True


# ------------------------------------------------------------------ helpers


def pick_target(target: str | None) -> str:
    """TARGET as given, or the run picked when none is (see core/target.py); says which on stderr."""
    from fastserve_cli.core.target import resolve_target

    return resolve_target(target, lambda line: sys.stderr.write(line + "\n"))


def load_target(target: str | None, overrides: list[str] | None):
    """A recipe file, or a run directory holding the resolved recipe.yaml of an earlier stage."""
    from fastserve_cli.core.recipe import load_recipe
    from fastserve_cli.core.rundir import RunDir

    path = Path(pick_target(target))
    if path.is_dir():
        run = RunDir(path)
        if not run.recipe_path.is_file():
            raise UserError(f"{path}: not a run directory (no recipe.yaml); pass a recipe file or a run directory")
        recipe = load_recipe(run.recipe_path, overrides or [])
        recipe.run_dir = str(run.root)
        return recipe
    if not path.exists():
        raise UserError(f"{path}: no such recipe file or run directory")
    return load_recipe(path, overrides or [])


def stdout_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_result(stage: str, result, run, as_json: bool) -> None:
    if as_json:
        stdout_json(
            {
                "stage": stage,
                "status": "done",
                "run_dir": str(run.root),
                "outputs": result.outputs,
                "metrics": result.metrics,
            }
        )
        return
    from fastserve_cli.core.console import metrics_table

    metrics_table(f"{stage} done: {run.root}", result.metrics)


def prepare_run(recipe):
    """The run directory, recorded as this working directory's last run (a later stage needs no TARGET)."""
    from fastserve_cli.core.pipeline import prepare_run_dir
    from fastserve_cli.core.target import remember_run

    run = prepare_run_dir(recipe)
    remember_run(run.root)
    return run


def run_stage_command(stage: str, target: str | None, overrides: list[str] | None, as_json: bool) -> None:
    from fastserve_cli.core.pipeline import execute

    recipe = load_target(target, overrides)
    run = prepare_run(recipe)
    with json_safe_stdout(as_json):
        result = execute(stage, recipe, run)
    print_result(stage, result, run, as_json)


def json_safe_stdout(as_json: bool):
    """With --json, stdout carries one JSON document: library chatter (deepspeed logs to stdout) goes to stderr."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


# ------------------------------------------------------------------ stages
