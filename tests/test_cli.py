"""The console script as a user runs it: help, version, exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastserve_cli.testing.corpus import SAMPLE_MODULES, STDLIB

FASTSERVE = [sys.executable, "-m", "fastserve_cli"]


def fastserve(*args: str, cwd: Path | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "FASTSERVE_RUN"}, "HF_HUB_OFFLINE": "1", **env_vars}
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
    path.write_text(
        f"name: cli\nrun_dir: run\ndata:\n  paths: [{paths}]\n  block_size: 64\ntokenizer:\n  vocab_size: 300\n{extra}"
    )
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["preprocess", "missing.yaml"], "error: missing.yaml: no such recipe file or run directory"),
        (["status", "nowhere"], "error: nowhere: no manifest.json here"),
        (["train"], "error: no TARGET given and no run under ./runs"),
        (["run", "RECIPE", "--force", "trian"], "error: unknown stage 'trian'"),
        (
            ["recipe", "validate", "RECIPE", "--set", "train.learning_rat=1"],
            "train.learning_rat: unknown key, did you mean learning_rate?",
        ),
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


def console_script() -> str:
    """The installed `fastserve` entry point (what a user types), beside this interpreter."""
    script = Path(sys.executable).with_name("fastserve")
    assert script.is_file(), f"{script}: the console script is not installed; run `make setup`"
    return str(script)


def test_target_is_optional_everywhere(tmp_path):
    """`fastserve train recipe.yaml` then `fastserve export --onnx` / `fastserve status`: the run the last stage
    wrote from this directory is used, and stderr says so in one line."""
    recipe = write_recipe(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "FASTSERVE_RUN"}
    done = subprocess.run(
        [console_script(), "preprocess", str(recipe)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / ".last").read_text().strip() == str((tmp_path / "run").resolve())
    status = subprocess.run(
        [console_script(), "status", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["stages"]["preprocess"]["status"] == "done"
    assert status.stderr.strip() == "using run run (runs/.last, the run the last stage wrote from here)"
    # train needs the preprocess output of the picked run: the stage's own check speaks, not "missing argument"
    export = subprocess.run(
        [console_script(), "export", "--onnx"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (
        export.returncode == 2 and "using run run" in export.stderr and "run `fastserve train` first" in export.stderr
    )


def test_target_from_env_and_the_only_run(tmp_path):
    recipe = write_recipe(tmp_path).read_text().replace("run_dir: run", "run_dir: runs/a")
    (tmp_path / "recipe.yaml").write_text(recipe)
    assert fastserve("preprocess", "recipe.yaml", cwd=tmp_path).returncode == 0
    (tmp_path / "runs" / ".last").unlink()
    only = fastserve("status", cwd=tmp_path)
    assert only.returncode == 0 and only.stderr.splitlines()[0] == "using run runs/a (the only run under ./runs)"
    second = tmp_path / "runs" / "b"
    second.mkdir()
    (second / "recipe.yaml").write_text(recipe)
    several = fastserve("status", cwd=tmp_path)
    assert several.returncode == 2 and len(several.stderr.strip().splitlines()) == 1
    assert "2 runs under ./runs (runs/a, runs/b); pass one of them or set FASTSERVE_RUN" in several.stderr
    chosen = fastserve("status", "--json", cwd=tmp_path, FASTSERVE_RUN=str(tmp_path / "runs" / "a"))
    assert chosen.returncode == 0 and "($FASTSERVE_RUN)" in chosen.stderr
    bad = fastserve("status", cwd=tmp_path, FASTSERVE_RUN=str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "FASTSERVE_RUN=" in bad.stderr and "not a run directory" in bad.stderr
