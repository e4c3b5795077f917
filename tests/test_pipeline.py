"""`fastserve run` semantics: skip unchanged stages, re-run downstream of a change, --force, --until."""

from __future__ import annotations

import sys
import types

import pytest

from fastserve_cli.core import pipeline
from fastserve_cli.core.errors import UserError
from fastserve_cli.core.pipeline import Stage, execute, prepare_run_dir, run_pipeline
from fastserve_cli.core.recipe import Recipe, resolve_paths
from fastserve_cli.core.rundir import StageResult
from fastserve_cli.testing.corpus import SAMPLE_MODULES, STDLIB


@pytest.fixture
def two_stage_pipeline(monkeypatch):
    """preprocess (real) followed by a small real downstream stage that counts its runs."""
    calls: list[str] = []
    import importlib.machinery

    module = types.ModuleType("fastserve_test_downstream")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)

    def run_downstream(recipe, run):
        calls.append(run.stage("preprocess")["run_id"])
        if recipe.train.max_steps == 13:
            raise RuntimeError("boom")
        return StageResult(outputs=[], metrics={"upstream_blocks": run.stage("preprocess")["metrics"]["train_blocks"]})

    module.run_downstream = run_downstream
    monkeypatch.setitem(sys.modules, module.__name__, module)
    stages = {
        "preprocess": pipeline.STAGES["preprocess"],
        "downstream": Stage("downstream", ("train",), ("preprocess",), module=module.__name__),
    }
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_ORDER", list(stages))
    return calls


def recipe_for(tmp_path, **train) -> Recipe:
    paths = [str(STDLIB / name) for name in SAMPLE_MODULES[:6]]
    raw = {
        "name": "p",
        "run_dir": str(tmp_path / "run"),
        "data": {"paths": paths, "block_size": 64},
        "tokenizer": {"vocab_size": 300},
        "train": train,
    }
    return resolve_paths(Recipe.model_validate(raw), tmp_path)


def test_skip_unchanged_and_rerun_downstream(tmp_path, two_stage_pipeline):
    calls = two_stage_pipeline
    recipe = recipe_for(tmp_path)
    run = prepare_run_dir(recipe)
    events = []
    outcomes = run_pipeline(recipe, run, set(), None, lambda s, e: events.append((s, e)))
    assert outcomes == {"preprocess": "ran", "downstream": "ran"}
    assert run_pipeline(recipe, run, set(), None) == {"preprocess": "skipped", "downstream": "skipped"}
    assert len(calls) == 1

    # a change in the downstream section re-runs only downstream
    changed = recipe_for(tmp_path, max_steps=7)
    assert run_pipeline(changed, run, set(), None)["downstream"] == "ran"
    assert run_pipeline(changed, run, set(), None)["downstream"] == "skipped"

    # forcing preprocess re-runs it and everything downstream of it
    first_id = run.stage("preprocess")["run_id"]
    outcomes = run_pipeline(changed, run, {"preprocess"}, None)
    assert outcomes["preprocess"] == "ran" and outcomes["downstream"] == "ran"
    assert calls[-1] == run.stage("preprocess")["run_id"] != first_id


def test_data_change_reruns_preprocess(tmp_path, two_stage_pipeline):
    corpus = tmp_path / "c.txt"
    corpus.write_text((STDLIB / "heapq.py").read_text())
    recipe = recipe_for(tmp_path)
    recipe.data.paths = [str(corpus), str(STDLIB / "bisect.py")]
    run = prepare_run_dir(recipe)
    run_pipeline(recipe, run, set(), None)
    corpus.write_text((STDLIB / "glob.py").read_text() * 2)
    assert run_pipeline(recipe, run, set(), None) == {"preprocess": "ran", "downstream": "ran"}


def test_until_stops_early(tmp_path, two_stage_pipeline):
    recipe = recipe_for(tmp_path)
    assert run_pipeline(recipe, prepare_run_dir(recipe), set(), "preprocess") == {"preprocess": "ran"}


def test_failed_stage_is_marked_and_reruns(tmp_path, two_stage_pipeline):
    recipe = recipe_for(tmp_path, max_steps=13)
    run = prepare_run_dir(recipe)
    with pytest.raises(RuntimeError):
        run_pipeline(recipe, run, set(), None)
    entry = run.stage("downstream")
    assert entry["status"] == "failed" and entry["error"] == "boom"
    assert run_pipeline(recipe_for(tmp_path), run, set(), None)["downstream"] == "ran"


def test_upstream_required(tmp_path, two_stage_pipeline):
    recipe = recipe_for(tmp_path)
    run = prepare_run_dir(recipe)
    with pytest.raises(UserError, match="run `fastserve preprocess` first"):
        execute("downstream", recipe, run)


def test_unknown_stage_name():
    with pytest.raises(UserError, match="unknown stage 'trian'; stages are: preprocess"):
        pipeline.validate_stage_name("trian")
