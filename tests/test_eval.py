"""`fastserve eval`: lm-eval tasks on a run's artifacts (in-process torch and ONNX, and through the server).

Runs are built by hand (a tiny random model, a real ONNX export); the tasks are the offline stdlib tasks shipped
in fastserve_cli/eval/tasks, plus task YAMLs written here. The CLI is called as users call it (exit codes, JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_model

from fastserve_cli.cli import main

pytest.importorskip("lm_eval")


def cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A run whose train and export stages are done: run/model (tiny GPT-2) and run/onnx (its export)."""
    from fastserve_cli.core.rundir import RunDir
    from fastserve_cli.export.onnx_graph import export_onnx

    root = tmp_path_factory.mktemp("eval-run")
    run = RunDir(root / "run")
    make_tiny_model("gpt2", tiny_tokenizer_dir, run.model_dir)
    export_onnx(run.model_dir, run.onnx_dir, parity_steps=2)
    for stage in ("preprocess", "train", "export"):
        run.update_stage(stage, status="done", run_id=f"{stage}-1")
    from fastserve_cli.core.report import REPORT_VERSION, make_row
    from fastserve_cli.core.rundir import atomic_write_json

    rows = [
        make_row("baseline", "none", "torch", "model", 1, 1, 10.0, 1.0),
        make_row("onnx_fp32", "onnx_export", "onnx", "onnx", 1, 1, 10.0, 1.0),
    ]
    atomic_write_json(run.report_path, {"version": REPORT_VERSION, "measurement": {}, "rows": rows})
    recipe = {
        "name": "evaltest",
        "run_dir": str(run.root),
        "eval": {"tasks": ["stdlib_next_line"], "limit": 4, "sources": ["model", "onnx"], "batch_size": 4},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return root


def test_model_and_onnx_side_by_side_then_a_gate(run_dir, capsys):
    recipe = str(run_dir / "recipe.yaml")
    assert cli("eval", recipe, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    sources = out["results"]["sources"]
    assert list(sources) == ["model", "onnx"] and sources["onnx"]["backend"] == "onnx"
    model_acc = sources["model"]["tasks"]["stdlib_next_line"]["acc"]
    assert 0 <= model_acc <= 1 and sources["onnx"]["tasks"]["stdlib_next_line"]["acc"] == model_acc
    manifest = json.loads((run_dir / "run" / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["status"] == "done"
    assert manifest["stages"]["eval"]["metrics"]["onnx.stdlib_next_line.acc"] == model_acc
    assert (run_dir / "run" / "eval" / "results.json").is_file()
    report = {r["name"]: r for r in json.loads((run_dir / "run" / "optimized" / "report.json").read_text())["rows"]}
    assert report["baseline"]["details"]["eval"]["stdlib_next_line"]["acc"] == model_acc
    assert report["onnx_fp32"]["details"]["eval_deltas"]["stdlib_next_line"]["acc"] == 0

    assert cli("eval", recipe, "--set", "gates.eval.stdlib_next_line.acc=1.01", "--source", "model") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model: gates.eval.stdlib_next_line.acc" in err and "below the minimum 1.01" in err
    assert f"{model_acc:.4g}" in err
    manifest = json.loads((run_dir / "run" / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["status"] == "failed"


def test_local_task_yaml_and_bad_input(run_dir, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"q": f"x = {i}\ny = ", "choices": [f"{i}", "None"], "label": 0}) + "\n" for i in range(3))
    )
    good = tmp_path / "tasks" / "tiny_mc.yaml"
    good.parent.mkdir()
    good.write_text(
        yaml.safe_dump(
            {
                "task": "tiny_mc",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "q",
                "doc_to_choice": "choices",
                "doc_to_target": "label",
                "target_delimiter": "",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    recipe = str(run_dir / "recipe.yaml")
    assert cli("eval", recipe, "--task", str(good), "--source", "model", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert "acc" in out["results"]["sources"]["model"]["tasks"]["tiny_mc"]

    broken = tmp_path / "broken.yaml"
    broken.write_text("task: broken\ndoc_to_text: a: b\n")
    hub = tmp_path / "hub.yaml"
    hub.write_text(
        yaml.safe_dump(
            {
                "task": "hub_task",
                "dataset_path": "no-such-org/no-such-dataset",
                "output_type": "multiple_choice",
                "test_split": "test",
                "doc_to_text": "q",
                "doc_to_choice": "c",
                "doc_to_target": "l",
            }
        )
    )
    for task, expected in [
        (str(broken), "broken.yaml: line 2"),
        (str(hub), "'no-such-org/no-such-dataset'"),
        ("stdlib_nextline", "unknown task 'stdlib_nextline'; did you mean stdlib_next_line"),
    ]:
        assert cli("eval", recipe, "--task", task) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert expected in lines[-1] and lines[-1].startswith("error: eval.tasks"), lines[-1]


@pytest.mark.slow
def test_server_gives_the_same_accuracy_as_lm_eval_hf(run_dir):
    """A log-likelihood task through `fastserve serve` (echo + logprobs) = lm-eval's `hf` model on the directory."""
    from lm_eval import simple_evaluate

    from fastserve_cli.core.recipe import load_recipe
    from fastserve_cli.core.rundir import RunDir
    from fastserve_cli.eval.stage import run_eval
    from fastserve_cli.eval.tasks import plan_tasks, task_manager

    recipe = load_recipe(run_dir / "recipe.yaml", ["eval.limit=8", "eval.sources=[{source: model, via: server}, onnx]"])
    result = run_eval(recipe, RunDir(recipe.run_dir))
    manager = task_manager(plan_tasks(["stdlib_next_line"]))
    reference = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(run_dir / "run" / "model"), "device": "cpu"},
        tasks=["stdlib_next_line"],
        limit=8,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )["results"]["stdlib_next_line"]
    for label in ("model@server", "onnx"):
        assert result.metrics[f"{label}.stdlib_next_line.acc"] == reference["acc,none"]
        assert result.metrics[f"{label}.stdlib_next_line.acc_norm"] == reference["acc_norm,none"]


def test_gate_bounds_min_max_and_unmeasured():
    from fastserve_cli.eval.stage import add_deltas, check_gates

    results = {
        "model": {"tasks": {"t": {"acc": 0.5, "bits_per_byte": 2.0}}},
        "int8": {"tasks": {"t": {"acc": 0.4, "bits_per_byte": 2.5}}},
    }
    add_deltas(results)
    assert results["int8"]["deltas"]["t"] == pytest.approx({"acc": -0.1, "bits_per_byte": 0.5})
    gates = {"t": {"acc": 0.45, "bits_per_byte": {"max": 2.2}, "f1": 0.1}}
    assert check_gates(gates, results) == [
        "model: gates.eval.t.f1: not measured (is t in eval.tasks and f1 one of its metrics?)",
        "int8: gates.eval.t.acc: 0.4 is below the minimum 0.45",
        "int8: gates.eval.t.bits_per_byte: 2.5 is above the maximum 2.2",
        "int8: gates.eval.t.f1: not measured (is t in eval.tasks and f1 one of its metrics?)",
    ]
