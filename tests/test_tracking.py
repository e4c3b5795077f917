"""train.report_to: the numbers of metrics.jsonl reach TensorBoard and MLflow (read back from their local
stores), and optimize's report rows follow as run metrics and an artifact."""

from __future__ import annotations

import json

import pytest
from test_train import corpus_root, fresh_run, metrics, preprocessed  # noqa: F401 (fixtures)

from fastserve_cli.core.pipeline import execute

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def tracked_run(preprocessed, corpus_root):  # noqa: F811 (fixtures from test_train)
    recipe, run = fresh_run(preprocessed, corpus_root, "tracked", train={"report_to": ["tensorboard", "mlflow"]})
    execute("train", recipe, run)
    execute("optimize", recipe, run)
    return recipe, run


def mlflow_runs(run) -> dict:
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run.root / "tracking" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("t")
    found = client.search_runs([experiment.experiment_id])
    return client, {r.info.run_name: r for r in found}


def test_tensorboard_events_hold_the_training_losses(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = tracked_run
    logdirs = [p.parent for p in (run.root / "tracking" / "tensorboard").rglob("events.out.tfevents.*")]
    assert logdirs, "no TensorBoard event file written"
    events = EventAccumulator(str(logdirs[0]))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    expected = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    assert logged.keys() == expected.keys()
    assert all(abs(logged[s] - expected[s]) < 1e-5 for s in expected)
    assert "eval_perplexity" in events.Tags()["scalars"]


def test_mlflow_store_holds_train_metrics_and_the_optimize_report(tracked_run):
    _, run = tracked_run
    client, runs = mlflow_runs(run)
    assert {"t-train", "t-optimize"} <= set(runs)
    history = client.get_metric_history(runs["t-train"].info.run_id, "loss")
    expected = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    assert {m.step: round(m.value, 5) for m in history} == {s: round(v, 5) for s, v in expected.items()}
    assert runs["t-train"].data.params["train.max_steps"] == "8"
    optimize = runs["t-optimize"]
    report = json.loads(run.report_path.read_text())
    baseline = next(r for r in report["rows"] if r["name"] == "baseline")
    assert optimize.data.metrics["baseline.perplexity"] == pytest.approx(baseline["perplexity"])
    artifacts = [a.path for a in client.list_artifacts(optimize.info.run_id)]
    assert "optimize_report.json" in artifacts
