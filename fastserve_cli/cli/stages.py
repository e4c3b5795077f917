"""The stage commands: preprocess, train, optimize, export, eval."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from fastserve_cli.cli.common import (
    JsonOption,
    SetOption,
    TargetArgument,
    app,
    json_safe_stdout,
    load_target,
    prepare_run,
    run_stage_command,
    stdout_json,
)


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


def execute_showing(stage: str, recipe, run, as_json: bool, show, gate_failure: type[Exception]) -> None:
    """Run a stage whose result is a table (optimize's report, eval's results); on a broken gate the table (or
    JSON) comes first, then the one-line error naming gate, bound and value."""
    from fastserve_cli.core.pipeline import execute

    try:
        with json_safe_stdout(as_json):
            execute(stage, recipe, run)
    except gate_failure:
        show("failed")
        raise
    show("done")


@app.command()
def optimize(
    target: Optional[str] = TargetArgument, set_: Optional[list[str]] = SetOption, as_json: bool = JsonOption
) -> None:
    """Pruning and quantization variants, with a quality/size/speed report and gates (exit 2 when one breaks)."""
    from fastserve_cli.core.report import GateFailure, load_report, print_report

    recipe = load_target(target, set_)
    run = prepare_run(recipe)

    def show(status: str) -> None:
        report = load_report(run)
        if report is not None:
            stdout_json(
                {"stage": "optimize", "status": status, "run_dir": str(run.root), "report": report}
            ) if as_json else print_report(report)

    execute_showing("optimize", recipe, run, as_json, show, GateFailure)


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
    from fastserve_cli.core.pipeline import STAGES, prepare_run_dir
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

    execute_showing("eval", recipe, run, as_json, show, EvalGateFailure)
