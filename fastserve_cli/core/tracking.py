"""Experiment tracking through accelerate's trackers (`train.report_to`): tensorboard, mlflow, wandb, trackio, ...

Each stage that has numbers opens the recipe's trackers under one run name per stage (`<recipe>-train`,
`<recipe>-optimize`, `<recipe>-export`) in experiment/project `<recipe>`: train logs what it writes to
metrics.jsonl, optimize the report's rows, export its parity. Local defaults keep everything in the run
directory: TensorBoard event files under `tracking/tensorboard/`, an MLflow file store under
`tracking/mlruns/` unless MLFLOW_TRACKING_URI points elsewhere. Nothing is imported until a tracker is asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastserve_cli.core.errors import UserError

# accelerate's LoggerType values (accelerate 1.15) minus "all"; recipe validation must not import accelerate.
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


class Trackers:
    """The recipe's trackers for one stage; a no-op when `names` is empty."""

    def __init__(
        self, names: list[str], experiment: str, stage: str, run_root: Path, config: dict[str, Any] | None = None
    ):
        self.trackers: list[Any] = []
        if not names:
            return
        from accelerate.state import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
        from accelerate.utils import is_mlflow_available, is_tensorboard_available

        PartialState()  # the trackers log from the main process only
        available = {"tensorboard": is_tensorboard_available, "mlflow": is_mlflow_available}
        root = Path(run_root) / "tracking"
        for name in names:
            if name in available and not available[name]():
                raise UserError(
                    f"train.report_to: {name} is not installed; pip install 'fastserve[tracking]' "
                    f"or remove it from train.report_to"
                )
            self.trackers.append(self._start(LOGGER_TYPE_TO_CLASS[name], name, experiment, stage, root))
        if config:
            flat = flatten(config)
            for tracker in self.trackers:
                tracker.store_init_configuration(flat)

    @staticmethod
    def _start(cls: Any, name: str, experiment: str, stage: str, root: Path) -> Any:
        run_name = f"{experiment}-{stage}"
        if name == "tensorboard":
            tracker = cls(run_name, root / "tensorboard")
        elif name == "mlflow":
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store in the run (MLflow 3 asks to opt in)
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((root / "mlruns").resolve().as_uri())
            tracker = cls(experiment_name=experiment, run_name=run_name)
        else:
            tracker = (
                cls(experiment, run_name=run_name)
                if "run_name" in cls.__init__.__code__.co_varnames
                else cls(experiment)
            )
        tracker.start()
        return tracker

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Numeric values only (trackers refuse strings and None in metrics)."""
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def log_json(self, name: str, obj: Any) -> None:
        """A JSON document as an artifact (MLflow) or a text summary (TensorBoard)."""
        text = json.dumps(obj, indent=2, default=str)
        for tracker in self.trackers:
            if tracker.name == "mlflow":
                import mlflow

                mlflow.log_dict(obj, f"{name}.json")
            elif tracker.name == "tensorboard":
                tracker.writer.add_text(name, f"```\n{text}\n```")

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys with scalar values (what hyper-parameter tables accept)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat
