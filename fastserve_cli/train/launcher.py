"""Multi-process launch under torchrun (the loop itself is in loop.py, signal handling in signals.py).

`launch_processes` relaunches this module under torchrun (`Accelerator(cpu=True)` there is real gloo
DDP on CPU; see stack-notes: `accelerate launch --cpu` silently runs one process); each worker runs
`worker_main`, and rank 0 hands the StageResult back in a file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import Recipe
from fastserve_cli.core.rundir import RunDir, StageResult, atomic_write_json
from fastserve_cli.train.distributed import cuda_available, rank

LAUNCH_FILE = ".train-launch.json"
RESULT_FILE = ".train-result.json"


def launch_processes(recipe: Recipe, run: RunDir) -> StageResult:
    """Run N copies of this module under torchrun; rank 0 hands back the StageResult in a file."""
    import subprocess

    n = recipe.train.num_processes
    launch, result = run.root / LAUNCH_FILE, run.root / RESULT_FILE
    atomic_write_json(launch, recipe.model_dump(mode="json"))
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    if not cuda_available():
        threads = recipe.train.num_threads or max(1, (os.cpu_count() or 1) // n)
        env["OMP_NUM_THREADS"] = str(threads)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "fastserve_cli.train.launcher",
        str(launch),
        str(result),
    ]
    proc = subprocess.Popen(command, env=env, stdout=sys.stderr)  # our stdout is for the result (--json)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the workers got the signal too: they checkpoint and stop
        proc.wait(timeout=120)
        raise
    finally:
        launch.unlink(missing_ok=True)
    if code != 0 or not result.is_file():
        raise UserError(f"train: {n} worker processes failed (exit {code}); the error is printed above")
    payload = json.loads(result.read_text(encoding="utf-8"))
    result.unlink()
    return StageResult(outputs=payload["outputs"], metrics=payload["metrics"])


def worker_main(argv: list[str]) -> int:
    """torchrun entry point: `python -m fastserve_cli.train.launcher LAUNCH.json RESULT.json`."""
    from fastserve_cli.train.loop import Trainer

    launch, result = Path(argv[0]), Path(argv[1])
    recipe = Recipe.model_validate(json.loads(launch.read_text(encoding="utf-8")))
    run = RunDir(recipe.run_dir or launch.parent)
    try:
        outcome = Trainer(recipe, run).fit()
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    if rank() == 0:
        atomic_write_json(result, {"outputs": outcome.outputs, "metrics": outcome.metrics})
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
