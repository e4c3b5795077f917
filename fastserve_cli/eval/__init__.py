"""`fastserve eval`: lm-evaluation-harness tasks on the run's model, optimize variants and ONNX export,
in-process or through `fastserve serve`, with results in the manifest and `gates.eval`."""

from fastserve_cli.eval.stage import run_eval

__all__ = ["run_eval"]
