"""Typer commands: parse arguments, load the recipe, call the stage. Nothing else lives here.

Heavy libraries (torch, transformers, datasets) are imported by the stages, never at module level,
so `fastserve --help` stays instant.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer._click import exceptions as click_exceptions  # typer >= 0.20 vendors click

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


@app.command()
def preprocess(
    target: Optional[str] = TargetArgument, set_: Optional[list[str]] = SetOption, as_json: bool = JsonOption
) -> None:
    """Raw text/jsonl/csv/parquet -> tokenizer + tokenized, packed dataset in the run directory."""
    run_stage_command("preprocess", target, set_, as_json)


@app.command()
def train(
    target: Optional[str] = TargetArgument,
    num_processes: Optional[int] = typer.Option(
        None,
        "--num-processes",
        min=1,
        help="Data-parallel processes (real DDP: gloo on CPU, NCCL on GPUs), relaunched under torchrun; sets train.num_processes.",
    ),
    set_: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Train the model on the preprocessed data (resumes from the newest checkpoint).

    Multi-GPU / multi-node: `accelerate launch [--multi_gpu --num_machines ...] -m fastserve_cli train RECIPE`
    (or torchrun / deepspeed); only rank 0 records the stage in the manifest.
    """
    overrides = [*(set_ or []), *([f"train.num_processes={num_processes}"] if num_processes else [])]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        from fastserve_cli.core.rundir import RunDir
        from fastserve_cli.train.stage import run_train

        recipe = load_target(target, overrides)  # a worker rank of an external launcher: rank 0 keeps the manifest
        run_train(recipe, RunDir(recipe.run_dir or f"runs/{recipe.name}"))
        return
    try:
        run_stage_command("train", target, overrides, as_json)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: a checkpoint was saved; exit 130 (click would return 0 here)
        sys.stderr.write("interrupted\n")
        sys.exit(130)


@app.command()
def optimize(
    target: Optional[str] = TargetArgument, set_: Optional[list[str]] = SetOption, as_json: bool = JsonOption
) -> None:
    """Pruning and quantization variants, with a quality/size/speed report and gates (exit 2 when one breaks)."""
    from fastserve_cli.core.pipeline import execute
    from fastserve_cli.core.report import GateFailure, load_report, print_report

    recipe = load_target(target, set_)
    run = prepare_run(recipe)

    def show(status: str) -> None:
        report = load_report(run)
        if report is not None:
            stdout_json(
                {"stage": "optimize", "status": status, "run_dir": str(run.root), "report": report}
            ) if as_json else print_report(report)

    try:
        with json_safe_stdout(as_json):
            execute("optimize", recipe, run)
    except GateFailure:  # the table (or JSON) first, then the one-line error naming gate, bound and value
        show("failed")
        raise
    show("done")


@app.command()
def export(
    target: Optional[str] = TargetArgument,
    onnx: bool = typer.Option(
        False, "--onnx", help="ONNX with KV cache: the format written, with or without the flag."
    ),
    set_: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Export to ONNX with KV cache, verified against PyTorch with onnxruntime."""
    run_stage_command("export", target, set_, as_json)


@app.command("eval")
def eval_(
    target: str = TargetArgument,
    task: Optional[list[str]] = typer.Option(
        None, "--task", help="lm-eval task/group name or task YAML path (repeatable); sets eval.tasks."
    ),
    source: Optional[list[str]] = typer.Option(
        None,
        "--source",
        help="model, a variant, onnx; SOURCE@server to go through `fastserve serve` (repeatable); sets eval.sources.",
    ),
    limit: Optional[float] = typer.Option(None, "--limit", help="Documents per task; sets eval.limit."),
    set_: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """lm-evaluation-harness tasks on the model, optimize variants and ONNX export, side by side (gates: exit 2)."""
    from fastserve_cli.core.pipeline import STAGES, execute, prepare_run_dir
    from fastserve_cli.eval.report import print_results
    from fastserve_cli.eval.stage import EvalGateFailure, load_results

    sources = [
        json.dumps({"source": s.split("@")[0], "via": "server"} if s.endswith("@server") else s) for s in source or []
    ]
    tasks = [str(Path(t).resolve()) if Path(t).exists() else t for t in task or []]  # paths: relative to the cwd
    overrides = [
        *(set_ or []),
        *([f"eval.tasks={json.dumps(tasks)}"] if tasks else []),
        *([f"eval.sources=[{', '.join(sources)}]"] if sources else []),
        *([f"eval.limit={limit}"] if limit is not None else []),
    ]
    STAGES["eval"].load()
    recipe = load_target(target, overrides)
    run = prepare_run_dir(recipe)

    def show(status: str) -> None:
        document = load_results(run)
        if as_json:
            stdout_json({"stage": "eval", "status": status, "run_dir": str(run.root), "results": document})
        elif document is not None:
            print_results(document)
        else:
            from fastserve_cli.core.console import err_console

            err_console().print(
                "eval: eval.tasks is empty, nothing was evaluated (set it in the recipe or pass --task)"
            )

    try:
        with json_safe_stdout(as_json):
            execute("eval", recipe, run)
    except EvalGateFailure:  # the table (or JSON) first, then the one-line error naming source, gate and value
        show("failed")
        raise
    show("done")


def serving_target(target: str | None, overrides: list[str] | None, flags: dict[str, Any]):
    """What `serve` and `batch` load: (ServeTarget, ServeConfig) from a run directory, a recipe or a model
    directory, with the recipe's serve section, --set overrides and flags on top."""
    from fastserve_cli.serve import resolve_target, serve_config

    path = Path(pick_target(target))
    is_model_dir = path.is_dir() and not (path / "recipe.yaml").is_file()
    recipe = None if is_model_dir else load_target(str(path), overrides)
    cfg = serve_config(recipe, (overrides or []) if is_model_dir else [], flags)
    if recipe is not None:
        return resolve_target(path, cfg.backend, cfg.source, recipe), cfg
    # a bare model directory picks its backend from its files unless --backend or --set serve.backend says
    backend = flags.get("backend") or (
        cfg.backend if any(o.startswith("serve.backend=") for o in overrides or []) else None
    )
    return resolve_target(path, backend, cfg.source, None), cfg


@app.command()
def serve(
    target: Optional[str] = typer.Argument(
        None,
        help="A run directory, a recipe, or a model/ONNX directory; default: as for the stage commands.",
        show_default=False,
    ),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (serve.host, default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="TCP port (serve.port, default 8000)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch or onnx."),
    source: Optional[str] = typer.Option(
        None, "--source", help="With a run directory: model, onnx or an optimize variant."
    ),
    scheduler: Optional[str] = typer.Option(
        None,
        "--scheduler",
        help="skip-join-mlfq (default: FastServe, short requests first), fcfs, or srpt-oracle (a benchmark bound that reads max_tokens).",
    ),
    starvation_s: Optional[float] = typer.Option(
        None, "--starvation-s", help="skip-join-mlfq: promote requests waiting longer than this to the top queue."
    ),
    base_quantum_s: Optional[float] = typer.Option(
        None, "--base-quantum-s", help="skip-join-mlfq: first queue's quantum; measured at start-up when unset."
    ),
    mlfq_levels: Optional[int] = typer.Option(
        None, "--mlfq-levels", help="skip-join-mlfq: number of queues (8); the last one is first come, first served."
    ),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Requests per iteration."),
    max_num_batched_tokens: Optional[int] = typer.Option(
        None, "--max-num-batched-tokens", help="Token budget per iteration."
    ),
    kv_cache_memory: Optional[str] = typer.Option(None, "--kv-cache-memory", help="KV-cache budget, e.g. 512MiB."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="FASTSERVE_API_KEY", help="Require this bearer key."
    ),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Waiting requests before 429."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Name clients send as `model`."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads; all cores when unset."),
    log_requests: Optional[str] = typer.Option(
        None, "--log-requests", help="Append each chat exchange to this JSONL (off by default; see docs/feedback.md)."
    ),
    replicas: Optional[int] = typer.Option(
        None, "--replicas", help="Engine replicas on Ray Serve (extra fastserve[ray]); 1 = this process."
    ),
    router: Optional[str] = typer.Option(
        None, "--router", help="With --replicas: least-loaded (default), round-robin or prefix."
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="`auto` joins a `ray start` cluster; unset starts a local one."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="torch backend: fp32 (default) or bf16 (CPUs with avx512_bf16/AMX, GPUs)."
    ),
    set_: Optional[list[str]] = SetOption,
) -> None:
    """OpenAI-compatible HTTP server with continuous batching (stops gracefully on SIGTERM)."""
    from fastserve_cli.serve import serve as run_server

    flags = dict(
        host=host,
        port=port,
        backend=backend,
        source=source,
        scheduler=scheduler,
        max_batch_size=max_batch_size,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_memory=kv_cache_memory,
        api_key=api_key,
        max_queue=max_queue,
        model_name=model_name,
        num_threads=threads,
        starvation_s=starvation_s,
        base_quantum_s=base_quantum_s,
        mlfq_levels=mlfq_levels,
        log_requests=log_requests,
        replicas=replicas,
        router=router,
        ray_address=ray_address,
        dtype=dtype,
    )
    resolved, cfg = serving_target(target, set_, flags)
    try:
        run_server(resolved, cfg)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGTERM/SIGINT it handled after a graceful shutdown
        return


@app.command()
def batch(
    target: str = typer.Argument(..., help="A run directory, a recipe, or a model/ONNX directory (as for serve)."),
    input_path: str = typer.Argument(..., metavar="REQUESTS", help="OpenAI Batch API input (.jsonl)."),
    output: str = typer.Option(..., "--output", "-o", help="Results (.jsonl); an existing one is resumed."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch or onnx."),
    source: Optional[str] = typer.Option(
        None, "--source", help="With a run directory: model, onnx or an optimize variant."
    ),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="fcfs (default here: best throughput) or skip-join-mlfq."
    ),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Requests per iteration."),
    kv_cache_memory: Optional[str] = typer.Option(None, "--kv-cache-memory", help="KV-cache budget, e.g. 512MiB."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The `model` the request bodies must name."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads; all cores when unset."),
    max_in_flight: int = typer.Option(
        1024, "--max-in-flight", min=1, help="Engine requests queued at once (bounds memory)."
    ),
    set_: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Answer an OpenAI Batch API file with the serving engine, in-process (resumable)."""
    from fastserve_cli.batch import run_batch

    flags = dict(
        backend=backend,
        source=source,
        scheduler=scheduler or "fcfs",
        max_batch_size=max_batch_size,
        kv_cache_memory=kv_cache_memory,
        model_name=model_name,
        num_threads=threads,
    )
    resolved, cfg = serving_target(target, set_, flags)
    result = run_batch(resolved, cfg, Path(input_path), Path(output), max_in_flight, show_progress=not as_json)
    if as_json:
        stdout_json({"command": "batch", "output": output, "metrics": result.metrics()})
        return
    from fastserve_cli.core.console import metrics_table

    metrics_table(f"batch done: {output}", result.metrics())


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


def _terminate(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so stages clean their temp output and are marked failed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    debug = STATE["debug"] or "--debug" in (argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _terminate)
    if debug:  # --debug also turns on debug logs (e.g. each request's MLFQ level history)
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("fastserve").setLevel(logging.DEBUG)
        logging.getLogger("fastserve_cli").setLevel(logging.DEBUG)
    try:
        code = app(args=argv, prog_name="fastserve", standalone_mode=False)
        if isinstance(code, int) and code:  # non-standalone click returns 130 on Ctrl-C instead of raising
            sys.stderr.write("interrupted\n")
            sys.exit(code)
    except UserError as err:
        if debug:
            raise
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except click_exceptions.UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError" and err.ctx is not None:
            sys.stdout.write(err.ctx.get_help() + "\n")
            sys.exit(0)
        command = err.ctx.command_path if err.ctx else "fastserve"
        sys.stderr.write(f"error: {err.format_message()} (see `{command} --help`)\n")
        sys.exit(2)
    except typer.Exit as err:  # typer >= 0.20's vendored click has no exceptions.Exit
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write("interrupted\n")
        sys.exit(130)
