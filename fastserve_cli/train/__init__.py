"""`fastserve train`: the accelerate training loop."""

from fastserve_cli.train.stage import run_train

__all__ = ["run_train"]
