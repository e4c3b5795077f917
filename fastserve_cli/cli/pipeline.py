"""run (every stage in order), status, and the recipe commands."""

from __future__ import annotations

from typing import Optional

import typer

from fastserve_cli.cli.common import (
    JsonOption,
    SetOption,
    TargetArgument,
    app,
    json_safe_stdout,
    load_target,
    pick_target,
    prepare_run,
    recipe_app,
    stdout_json,
)
from fastserve_cli.core.errors import UserError


@app.command()
def run(
    target: Optional[str] = TargetArgument,
    set_: Optional[list[str]] = SetOption,
    force: Optional[list[str]] = typer.Option(
        None, "--force", help="Re-run this stage (and so everything downstream)."
    ),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage."),
    as_json: bool = JsonOption,
) -> None:
    """Run every stage in order; stages whose inputs are unchanged are skipped."""
    from fastserve_cli.core.console import err_console
    from fastserve_cli.core.pipeline import run_pipeline, validate_stage_name

    forced = {validate_stage_name(s) for s in (force or [])}
    if until:
        validate_stage_name(until)
    recipe = load_target(target, set_)
    run_dir = prepare_run(recipe)

    def report(stage: str, event: str) -> None:
        messages = {
            "skipped": f"[dim]{stage}: unchanged, skipped[/dim]",
            "start": f"[bold]{stage}[/bold]: running",
            "done": f"[green]{stage}: done[/green]",
        }
        err_console().print(messages[event])

    with json_safe_stdout(as_json):
        outcomes = run_pipeline(recipe, run_dir, forced, until, report)
    if as_json:
        stdout_json({"run_dir": str(run_dir.root), "stages": outcomes})


@app.command()
def status(
    run_dir: Optional[str] = typer.Argument(
        None, help="A run directory; default: as for the stage commands.", show_default=False
    ),
    as_json: bool = JsonOption,
) -> None:
    """Show what each stage of a run did: status, timing, fingerprint, metrics."""
    from fastserve_cli.core.rundir import RunDir

    run_dir = pick_target(run_dir)
    run = RunDir(run_dir)
    if not run.exists():
        raise UserError(f"{run_dir}: no manifest.json here; pass a run directory (runs/<name>)")
    manifest = run.load_manifest()
    if as_json:
        stdout_json(manifest)
        return
    from fastserve_cli.core.console import manifest_table
    from fastserve_cli.core.pipeline import STAGE_ORDER

    manifest_table(run, manifest, STAGE_ORDER)


@recipe_app.command("validate")
def recipe_validate(
    path: str = typer.Argument(..., help="Recipe YAML."), set_: Optional[list[str]] = SetOption
) -> None:
    """Check a recipe (and overrides) against the schema without running anything."""
    from fastserve_cli.core.recipe import load_recipe

    recipe = load_recipe(path, set_ or [])
    typer.echo(f"{path}: ok (run directory {recipe.run_dir})")


@recipe_app.command("schema")
def recipe_schema_command() -> None:
    """Print the recipe's JSON schema."""
    from fastserve_cli.core.recipe import recipe_schema

    stdout_json(recipe_schema())


# ------------------------------------------------------------------ entry point
