"""`fastserve optimize`: pruning and quantization variants, each measured in a report with gates."""

from fastserve_cli.optimize.stage import run_optimize

__all__ = ["run_optimize"]
