"""`fastserve optimize`: variants, report, gates and bad input, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastserve_cli.testing.runs import make_trained_run

VARIANTS = [
    {"name": "int8", "method": "dynamic_int8"},
    {"name": "sparse50", "method": "magnitude", "sparsity": 0.5, "recovery_steps": 2},
    {
        "name": "heads-mlp",
        "method": "structured",
        "heads_per_layer": 1,
        "neurons_fraction": 0.25,
        "importance": "activation",
        "recovery_steps": 1,
        "calibration_blocks": 2,
    },
    {"name": "heads-mlp-int8", "method": "dynamic_int8", "source": "heads-mlp"},  # pruning and int8 compose
]


def fastserve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "fastserve_cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (fast for argument/recipe errors); returns (exit code, stdout, stderr)."""
    from fastserve_cli.cli import main

    capsys.readouterr()  # drop what building the run directory printed
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def check_report(run_root: Path, architecture: str) -> dict:
    """Every row measured, ratios consistent with the baseline, every variant loadable by name."""
    import torch

    from fastserve_cli.core.rundir import RunDir
    from fastserve_cli.models.loader import load_causal_lm

    run = RunDir(run_root)
    report = json.loads(run.report_path.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["baseline", "int8", "sparse50", "heads-mlp", "heads-mlp-int8"]
    base = rows["baseline"]
    assert base["ratios"]["size"] == 1.0 and base["path"] == "model" and base["backend"] == "torch"
    for row in rows.values():
        assert row["perplexity"] > 1 and row["decode_ms_per_token"] > 0 and row["gates"]["passed"]
        assert row["tokens_per_s"] == pytest.approx(1000 / row["decode_ms_per_token"])
        assert row["ratios"]["speedup"] == pytest.approx(base["decode_ms_per_token"] / row["decode_ms_per_token"])
        assert row["ratios"]["perplexity"] == pytest.approx(row["perplexity"] / base["perplexity"])
        model = load_causal_lm(run.root / row["path"])  # what serve/export will do with the variant name
        assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    assert rows["int8"]["ratios"]["linear_size"] < 0.3 and rows["int8"]["ratios"]["size"] < 1
    assert rows["int8"]["ratios"]["perplexity"] == pytest.approx(1.0, abs=0.05)
    assert rows["sparse50"]["details"]["sparsity"] >= 0.5 and rows["sparse50"]["details"]["recovery_loss"] > 0
    assert rows["heads-mlp"]["parameters"] < base["parameters"] and rows["heads-mlp"]["ratios"]["size"] < 1
    assert rows["heads-mlp"]["details"]["heads_per_layer"] == (
        2 if architecture == "llama" else 3
    )  # llama: 1 per kv group
    both = rows["heads-mlp-int8"]
    assert both["details"]["source"] == "heads-mlp" and both["parameters"] < rows["int8"]["parameters"]
    assert both["details"]["linear_weight_bytes"] < 0.3 * rows["heads-mlp"]["details"]["linear_weight_bytes"]
    stage = run.stage("optimize")
    assert stage["status"] == "done" and "int8.speedup" in stage["metrics"]
    return report


@pytest.mark.slow
def test_optimize_cli_json_end_to_end(tmp_path, tiny_tokenizer_dir):
    """The real command in a subprocess: stdout is exactly one JSON document (the report), exit 0."""
    recipe = make_trained_run(tmp_path, "gpt2", tiny_tokenizer_dir, VARIANTS)
    result = fastserve("optimize", str(recipe), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["status"] == "done" and printed["report"] == check_report(tmp_path / "run", "gpt2")


def test_optimize_llama_variants(tmp_path, tiny_tokenizer_dir, capsys):
    recipe = make_trained_run(tmp_path, "llama", tiny_tokenizer_dir, VARIANTS)
    code, out, _ = cli(capsys, "optimize", str(recipe))
    assert code == 0 and "optimize report" in out and "heads-mlp" in out
    check_report(tmp_path / "run", "llama")


def test_broken_gate_fails_the_command_naming_gate_bound_and_value(tmp_path, tiny_tokenizer_dir, capsys):
    """Magnitude pruning does not shrink the dense file, so a size gate fails; int8 passes it."""
    from fastserve_cli.core.rundir import RunDir

    variants = [
        {"name": "int8", "method": "dynamic_int8"},
        {"name": "sparse50", "method": "magnitude", "sparsity": 0.5},
    ]
    recipe = make_trained_run(tmp_path, "gpt2", tiny_tokenizer_dir, variants, gates={"max_size_ratio": 0.9})
    code, out, err = cli(capsys, "optimize", str(recipe))
    assert code == 2 and "optimize report" in out and "FAIL" in out
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "sparse50: gates.max_size_ratio: size ratio 1" in error[0] and "> bound 0.9" in error[0]
    assert "measured" in error[0] and "int8:" not in error[0] and "Traceback" not in err
    run = RunDir(tmp_path / "run")
    rows = {row["name"]: row for row in json.loads(run.report_path.read_text())["rows"]}
    assert not rows["sparse50"]["gates"]["passed"] and rows["int8"]["gates"]["passed"]
    assert rows["sparse50"]["gates"]["failures"][0] in error[0]
    assert run.stage("optimize")["status"] == "failed"


def test_optimize_before_train_writes_nothing(tmp_path, tiny_tokenizer_dir, capsys):
    recipe = make_trained_run(tmp_path, "gpt2", tiny_tokenizer_dir, VARIANTS[:1], train_done=False)
    code, _, err = cli(capsys, "optimize", str(recipe))
    assert code == 2 and "train" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "optimized").exists()


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"name": "x", "method": "prune_everything"}, "optimize.variants.0.method"),
        ({"name": "x", "method": "magnitude", "sparsity": 1.5}, "optimize.variants.0.sparsity"),
        ({"name": "x", "method": "magnitude", "sparsity": 0}, "optimize.variants.0.sparsity"),
        ({"name": "x", "method": "structured", "heads_per_layer": 4}, "only 4"),
        ({"name": "baseline", "method": "dynamic_int8"}, "reserved"),
        ({"name": "x", "method": "dynamic_int8", "source": "int8"}, "must name an earlier pruning variant"),
    ],
)
def test_bad_variants_fail_in_one_line_and_write_nothing(tmp_path, tiny_tokenizer_dir, capsys, variant, message):
    recipe = make_trained_run(tmp_path, "gpt2", tiny_tokenizer_dir, [variant])
    code, _, err = cli(capsys, "optimize", str(recipe))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "optimized").exists()


def test_export_can_add_rows_that_the_gates_judge(tmp_path, tiny_tokenizer_dir):
    """The contract the ONNX export uses: ensure_baseline, then add_rows with its own measured rows."""
    from fastserve_cli.core.recipe import load_recipe
    from fastserve_cli.core.report import add_rows, make_row
    from fastserve_cli.core.rundir import RunDir
    from fastserve_cli.models.measure import ensure_baseline, measurement_key

    recipe_path = make_trained_run(tmp_path, "gpt2", tiny_tokenizer_dir, VARIANTS[:1], gates={"min_speedup": 1.5})
    recipe = load_recipe(recipe_path)
    run = RunDir(recipe.run_dir)
    base = ensure_baseline(run, recipe)
    fast = make_row(
        "onnx-int8",
        "onnx_dynamic_int8",
        "onnx",
        "onnx/int8",
        1,
        base["size_bytes"] // 4,
        base["perplexity"] * 1.01,
        base["decode_ms_per_token"] / 2,
    )
    slow = make_row(
        "onnx-fp32", "onnx", "onnx", "onnx", 1, base["size_bytes"], base["perplexity"], base["decode_ms_per_token"]
    )
    failures = add_rows(run, recipe, measurement_key(run, recipe), [fast, slow])
    assert len(failures) == 1 and failures[0].startswith("onnx-fp32: gates.min_speedup: speedup 1x < bound 1.5x")
    report = json.loads(run.report_path.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["onnx-int8"]["ratios"]["speedup"] == pytest.approx(2.0) and rows["onnx-int8"]["gates"]["passed"]
    assert rows["onnx-int8"]["ratios"]["size"] == pytest.approx(0.25, abs=0.01)
    assert ensure_baseline(run, recipe) == rows["baseline"]  # not re-measured while model and settings are unchanged


def test_no_variants_reports_the_baseline_alone(tmp_path, tiny_tokenizer_dir, capsys):
    """`fastserve run` on a recipe without an optimize section still gets a report (the baseline row)."""
    recipe = make_trained_run(tmp_path, "llama", tiny_tokenizer_dir, [])
    code, out, _ = cli(capsys, "optimize", str(recipe), "--json")
    assert code == 0
    rows = json.loads(out[out.index("{") :])["report"]["rows"]
    assert [r["name"] for r in rows] == ["baseline"] and rows[0]["perplexity"] > 1
