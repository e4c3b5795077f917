"""The train stage: an accelerate loop with exact resume, LoRA, DeepSpeed and CPU/GPU multi-process.

`run_train` either trains in this process or, when `train.num_processes > 1` and no launcher started
us, relaunches itself under torchrun (launcher.py). External launches (`accelerate launch`,
`torchrun`, `deepspeed`) are detected from WORLD_SIZE and train directly.
"""

from __future__ import annotations

import os

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import Recipe
from fastserve_cli.core.rundir import RunDir, StageResult
from fastserve_cli.train.distributed import cuda_available, world_size


def run_train(recipe: Recipe, run: RunDir) -> StageResult:
    """Train on the run's preprocessed data and write `model/`; resumes from the newest checkpoint."""
    if not cuda_available():  # DeepSpeed's accelerator auto-detection warns on stdout (it breaks --json)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    check_inputs(recipe, run)
    if recipe.train.num_processes > 1 and world_size() == 1:
        from fastserve_cli.train.launcher import launch_processes

        return launch_processes(recipe, run)
    from fastserve_cli.train.loop import Trainer

    return Trainer(recipe, run).fit()


def check_inputs(recipe: Recipe, run: RunDir) -> None:
    """Fail before any heavy import when the recipe or the run directory cannot work."""
    cfg = recipe.train
    if not run.is_done("preprocess") or not run.data_dir.is_dir() or not run.tokenizer_dir.is_dir():
        raise UserError(f"{run.root}: no preprocessed data here; run `fastserve preprocess` first")
    if cfg.lora and not recipe.model.pretrained:
        raise UserError(
            "train.lora: LoRA fine-tunes a pretrained model; set model.pretrained to a local model directory or remove train.lora"
        )
    if cfg.mixed_precision == "fp16" and not cuda_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 (CPU autocast) or no")
    if cfg.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError(
                "train.deepspeed needs the deepspeed package; pip install 'fastserve[deepspeed]' or remove train.deepspeed"
            ) from None
        if cfg.torch_compile:
            raise UserError("train.torch_compile with train.deepspeed is not supported; turn one of them off")
