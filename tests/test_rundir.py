"""Run directory: atomic writes, staged directories, manifest bookkeeping."""

from __future__ import annotations

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.rundir import RunDir, atomic_write_json, read_json, staged_dir


def test_staged_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "artifact"
    with staged_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed midway")
    assert (final / "a.txt").read_text() == "one"  # the old complete artifact survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no temp left behind


def test_atomic_json_leaves_no_temp(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_manifest_updates_and_require(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.exists()
    with pytest.raises(UserError, match="run `fastserve preprocess` first"):
        run.require("preprocess")
    run.update_stage("preprocess", status="running")
    run.update_stage("preprocess", status="done", metrics={"tokens": 5})
    assert run.stage("preprocess") == {"status": "done", "metrics": {"tokens": 5}}
    run.require("preprocess")
    assert run.model_dir == run.root / "model" and run.variant_dir("int8") == run.root / "optimized" / "int8"


def test_corrupt_manifest_is_a_user_error(tmp_path):
    run = RunDir(tmp_path)
    run.manifest_path.write_text("{not json")
    with pytest.raises(UserError, match="manifest is not valid JSON"):
        run.load_manifest()


def test_running_stage_of_a_dead_process_reads_as_failed(tmp_path):
    run = RunDir(tmp_path)
    run.update_stage("train", status="running", pid=2**22 + 12345)
    entry = run.stage("train")
    assert entry["status"] == "failed" and "interrupted" in entry["error"]
    import os

    run.update_stage("train", status="running", pid=os.getpid())
    assert run.stage("train")["status"] == "running"


def test_stale_temps_are_removed(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / ".data.abc.tmp").mkdir()
    (tmp_path / ".manifest.json.x.tmp").write_text("{")
    (tmp_path / "keep").mkdir()
    run.remove_stale_temps()
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
