"""Stage registry and execution: fingerprints, manifest bookkeeping, skip-if-unchanged.

A stage is a plain function `run_<stage>(recipe, run_dir) -> StageResult` in package
`fastserve_cli.<stage>`, found by name when it runs (the registry names stages, it does not import them). This module wraps it: checks upstream stages, records status, timing,
fingerprint, outputs, metrics and library versions, and marks the stage failed on any error.
"""

from __future__ import annotations

import importlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import Recipe, dump_recipe
from fastserve_cli.core.rundir import RunDir, StageResult, atomic_write_text, fingerprint, library_versions, now_iso
from fastserve_cli.core.sources import find_files


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    module: str = ""

    @property
    def module_name(self) -> str:
        return self.module or f"fastserve_cli.{self.name}"

    def load(self) -> Callable[[Recipe, RunDir], StageResult]:
        return getattr(importlib.import_module(self.module_name), f"run_{self.name}")


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("preprocess", ("seed", "data", "tokenizer"), ()),
        Stage("train", ("seed", "model", "train"), ("preprocess",)),
        Stage("optimize", ("optimize", "gates"), ("train",)),
        Stage("export", ("export", "optimize", "gates"), ("train",)),
        Stage("eval", ("eval", "gates"), ("train",)),
    )
}
STAGE_ORDER = list(STAGES)


def input_files_digest(recipe: Recipe) -> list[tuple[str, int, int]] | str:
    """(path, size, mtime) of the local data files, so edited data re-runs preprocess."""
    if not recipe.data.paths:
        return []
    try:
        files = find_files(recipe.data)
    except UserError as err:  # the stage itself reports it; the fingerprint just has to differ
        return f"unreadable: {err}"
    return [(f, (st := os.stat(f)).st_size, int(st.st_mtime)) for f in files]


def upstream_of(stage: Stage, recipe: Recipe) -> tuple[str, ...]:
    if stage.name == "export" and recipe.export.source != "model":
        return ("train", "optimize")
    if stage.name == "eval":
        sources = {s.source for s in recipe.eval.sources} if recipe.eval.tasks else set()
        extra = (("optimize",) if sources - {"model", "onnx"} else ()) + (("export",) if "onnx" in sources else ())
        return stage.upstream + extra
    return stage.upstream


def stage_fingerprint(stage: Stage, recipe: Recipe, run: RunDir) -> str:
    parts: dict[str, Any] = {"sections": recipe.section_dump(*stage.sections)}
    if stage.name != "eval" and "gates" in parts["sections"]:  # eval gates re-run the eval stage only
        parts["sections"]["gates"].pop("eval", None)
    parts["upstream"] = {up: (run.stage(up) or {}).get("run_id") for up in upstream_of(stage, recipe)}
    if stage.name == "preprocess":
        parts["files"] = input_files_digest(recipe)
    return fingerprint(parts)


def prepare_run_dir(recipe: Recipe) -> RunDir:
    run = RunDir(recipe.run_dir or f"runs/{recipe.name}")
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.recipe_path, dump_recipe(recipe))
    return run


def execute(name: str, recipe: Recipe, run: RunDir) -> StageResult:
    """Run one stage with manifest bookkeeping; the stage is marked failed on any exception."""
    stage = STAGES[name]
    func = stage.load()
    for up in upstream_of(stage, recipe):
        run.require(up, f"{run.root}: the {up} stage has not finished here; run `fastserve {up}` first")
    started = time.time()
    run.remove_stale_temps()
    run.update_stage(
        name,
        status="running",
        started_at=now_iso(),
        finished_at=None,
        error=None,
        fingerprint=stage_fingerprint(stage, recipe, run),
        pid=os.getpid(),
    )
    try:
        result = func(recipe, run)
    except BaseException as err:
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else (str(err) or type(err).__name__)
        run.update_stage(name, status="failed", finished_at=now_iso(), error=reason.splitlines()[0][:500])
        raise
    run.update_stage(
        name,
        status="done",
        finished_at=now_iso(),
        duration_s=round(time.time() - started, 3),
        run_id=uuid.uuid4().hex,
        outputs=result.outputs,
        metrics=result.metrics,
        versions=library_versions(),
    )
    return result


def run_pipeline(
    recipe: Recipe,
    run: RunDir,
    force: set[str],
    until: str | None,
    on_event: Callable[[str, str], None] = lambda stage, event: None,
) -> dict[str, str]:
    """Run stages in order, skipping those whose fingerprint is unchanged; returns stage -> outcome.

    Fingerprints include the upstream stages' run ids, so re-running a stage re-runs everything
    downstream of it.
    """
    names = STAGE_ORDER[: STAGE_ORDER.index(until) + 1] if until else STAGE_ORDER
    outcomes: dict[str, str] = {}
    for name in names:
        stage = STAGES[name]
        entry = run.stage(name) or {}
        unchanged = entry.get("status") == "done" and entry.get("fingerprint") == stage_fingerprint(stage, recipe, run)
        if unchanged and name not in force:
            outcomes[name] = "skipped"
            on_event(name, "skipped")
            continue
        on_event(name, "start")
        execute(name, recipe, run)
        outcomes[name] = "ran"
        on_event(name, "done")
    return outcomes


def validate_stage_name(name: str) -> str:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_ORDER)}")
    return name
