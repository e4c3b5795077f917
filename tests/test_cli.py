"""The console script as a user runs it: help, version, exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE_MODULES, STDLIB

FASTSERVE = [sys.executable, "-m", "fastserve_cli"]


def fastserve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*FASTSERVE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_help_lists_every_command_without_heavy_imports():
    result = fastserve("--help")
    assert result.returncode == 0
    for command in ("preprocess", "train", "optimize", "export", "serve", "run", "status", "recipe"):
        assert command in result.stdout
    probe = "import sys, fastserve_cli.cli; print(sorted(m for m in ('torch','transformers','datasets') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_version():
    from fastserve_cli import __version__

    assert fastserve("--version").stdout.strip() == f"fastserve {__version__}"


def write_recipe(tmp_path: Path, extra: str = "") -> Path:
    paths = ", ".join(f"'{STDLIB / m}'" for m in SAMPLE_MODULES[:6])
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: cli\nrun_dir: run\ndata:\n  paths: [{paths}]\n  block_size: 64\ntokenizer:\n  vocab_size: 300\n{extra}")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["preprocess", "missing.yaml"], "error: missing.yaml: no such recipe file or run directory"),
        (["status", "nowhere"], "error: nowhere: no manifest.json here"),
        (["train"], "error: Missing argument 'TARGET'"),
        (["run", "RECIPE", "--force", "trian"], "error: unknown stage 'trian'"),
        (["recipe", "validate", "RECIPE", "--set", "train.learning_rat=1"], "train.learning_rat: unknown key, did you mean learning_rate?"),
        (["preprocess", "RECIPE", "--bogus"], "error: No such option: --bogus"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, args, message):
    recipe = write_recipe(tmp_path)
    result = fastserve(*[str(recipe) if a == "RECIPE" else a for a in args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message.lower() in result.stderr.lower()
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = fastserve("--debug", "status", str(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_recipe_validate_and_schema(tmp_path):
    recipe = write_recipe(tmp_path)
    result = fastserve("recipe", "validate", str(recipe), "--set", "train.max_steps=5")
    assert result.returncode == 0 and "ok" in result.stdout
    schema = json.loads(fastserve("recipe", "schema").stdout)
    assert "train" in schema["properties"]


def test_preprocess_json_then_status_and_run_skips(tmp_path):
    recipe = write_recipe(tmp_path)
    result = fastserve("preprocess", str(recipe), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["stage"] == "preprocess" and payload["metrics"]["documents"] == 6
    run_dir = tmp_path / "run"
    status = json.loads(fastserve("status", str(run_dir), "--json").stdout)
    assert status["stages"]["preprocess"]["status"] == "done"
    table = fastserve("status", str(run_dir))
    assert table.returncode == 0 and "preprocess" in table.stdout and "done" in table.stdout
    # the run directory itself is a valid target, and an unchanged stage is skipped
    again = fastserve("run", str(run_dir), "--until", "preprocess", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["stages"] == {"preprocess": "skipped"}
