"""The eval stage: lm-evaluation-harness tasks on the run's artifacts, side by side, with gates.

For each source (`model`, optimize variants, `onnx`; in-process or through `fastserve serve`) and each task,
the headline metrics go to `eval/results.json` and the manifest; `gates.eval` bounds are checked on every
source after all of them ran (so the table shows everything), and a broken one fails the stage naming the
source, task, metric, bound and value.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import Recipe
from fastserve_cli.core.report import BASELINE, load_report
from fastserve_cli.core.rundir import RunDir, StageResult, atomic_write_json, read_json
from fastserve_cli.eval import sources as src_mod
from fastserve_cli.eval.tasks import check_names, load_tasks, plan_tasks, task_manager

RESULTS = "eval/results.json"


class EvalGateFailure(UserError):
    """A source broke a `gates.eval` bound; results.json is already written."""


def results_path(run: RunDir):
    return run.root / RESULTS


def load_results(run: RunDir) -> dict[str, Any] | None:
    path = results_path(run)
    return read_json(path) if path.is_file() else None


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("fastserve eval needs lm-evaluation-harness: pip install 'fastserve[eval]'") from None


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `metric,filter` keys -> {metric: value} (first filter wins; stderr kept as metric_stderr)."""
    out: dict[str, float] = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric = key.split(",", 1)[0]
        if metric not in out and math.isfinite(float(value)):
            out[metric] = float(value)
    return out


def evaluate_source(lm, tasks: dict[str, Any], cfg, manager) -> dict[str, dict[str, float]]:
    from lm_eval import simple_evaluate

    per_task: dict[str, dict[str, float]] = {}
    for task_dict in tasks.values():
        res = simple_evaluate(
            model=lm,
            tasks=list(_task_objects(task_dict)),
            num_fewshot=cfg.num_fewshot,
            limit=_limit(cfg.limit),
            log_samples=False,
            bootstrap_iters=0,
            verbosity="ERROR",
            task_manager=manager,
        )
        for name, values in (res or {}).get("results", {}).items():
            metrics = _metrics(values)
            if metrics:
                per_task[name] = metrics
    return per_task


def _task_objects(task_dict: dict) -> list:
    """The Task objects of a get_task_dict result (groups nest their tasks one level down)."""
    for value in task_dict.values():
        if isinstance(value, dict):
            yield from _task_objects(value)
        else:
            yield value


def _limit(limit: float | None) -> int | float | None:
    return int(limit) if limit is not None and limit >= 1 else limit


def add_deltas(results: dict[str, Any]) -> None:
    """Each source's metrics minus the trained model's (`model`, else the first source), per task: what an
    optimization or the export cost in quality."""
    if len(results) < 2:
        return
    baseline = "model" if "model" in results else next(iter(results))
    base = results[baseline]["tasks"]
    for label, entry in results.items():
        if label != baseline:
            entry["baseline"] = baseline
            entry["deltas"] = {
                task: {
                    m: v - base[task][m]
                    for m, v in values.items()
                    if not m.endswith("_stderr") and m in base.get(task, {})
                }
                for task, values in entry["tasks"].items()
                if task in base
            }


REPORT_ROW = {"model": BASELINE, "onnx": "onnx_fp32"}  # eval source -> its optimize-report row (variants: same name)


def record_in_report(run: RunDir, results: dict[str, Any]) -> None:
    """Each evaluated source's metrics and deltas to the trained model into its row of the optimize report
    (`details.eval`, `details.eval_deltas`), beside perplexity, size and speed; rows of sources not evaluated
    this time keep what they had."""
    report = load_report(run)
    if report is None:
        return
    rows = {row["name"]: row for row in report["rows"]}
    for entry in results.values():
        row = rows.get(REPORT_ROW.get(entry["source"], entry["source"]))
        if row is None or entry.get("via") == "server":
            continue
        row["details"]["eval"] = entry["tasks"]
        if entry.get("deltas"):
            row["details"]["eval_deltas"] = entry["deltas"]
    atomic_write_json(run.report_path, report)


def check_gates(gates: dict[str, dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """One line per broken bound: `source: gates.eval.TASK.METRIC: value < min bound`."""
    failures = []
    for label, entry in results.items():
        for task, bounds in gates.items():
            measured = entry["tasks"].get(task)
            for metric, bound in bounds.items():
                where = f"{label}: gates.eval.{task}.{metric}"
                value = None if measured is None else measured.get(metric)
                if value is None:
                    failures.append(f"{where}: not measured (is {task} in eval.tasks and {metric} one of its metrics?)")
                    continue
                limits = bound if isinstance(bound, dict) else {"min": bound}
                if "min" in limits and value < limits["min"]:
                    failures.append(f"{where}: {value:.4g} is below the minimum {limits['min']:g}")
                if "max" in limits and value > limits["max"]:
                    failures.append(f"{where}: {value:.4g} is above the maximum {limits['max']:g}")
    return failures


def run_eval(recipe: Recipe, run: RunDir) -> StageResult:
    cfg = recipe.eval
    if not cfg.tasks:
        results_path(run).unlink(missing_ok=True)  # no stale table from an earlier configuration
        return StageResult(outputs=[], metrics={"tasks": 0})
    _require_lm_eval()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    sources = [src_mod.resolve_source(run, s.source, s.via) for s in cfg.sources]  # every source checked first
    plan = plan_tasks(cfg.tasks)
    manager = task_manager(plan)
    check_names(plan, manager)
    tasks = load_tasks(plan, manager)
    max_length = cfg.max_length  # None: the model's context (config.json), which train sets to the block size
    results: dict[str, Any] = {}
    for src in sources:
        started = time.time()
        results[src.label] = {
            "source": src.source,
            "via": src.via,
            "backend": src.backend,
            "dir": run.rel(src.model_dir),
            "tasks": _run_source(src, tasks, cfg, max_length, run, manager),
        }
        results[src.label]["duration_s"] = round(time.time() - started, 2)
    add_deltas(results)
    failures = check_gates(recipe.gates.eval, results)
    document = {
        "tasks": plan.names,
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "max_length": max_length,
        "sources": results,
        "gates": recipe.gates.eval,
        "gate_failures": failures,
    }
    atomic_write_json(results_path(run), document)
    record_in_report(run, results)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise EvalGateFailure(f"eval gate failed: {failures[0]}{more}")
    metrics = {
        f"{label}.{task}.{metric}": value
        for label, entry in results.items()
        for task, values in entry["tasks"].items()
        for metric, value in values.items()
        if not metric.endswith("_stderr")
    }
    return StageResult(outputs=[RESULTS], metrics=metrics)


def _run_source(
    src, tasks: dict[str, Any], cfg, max_length: int | None, run: RunDir, manager
) -> dict[str, dict[str, float]]:
    if src.via == "server":
        log_path = run.root / "eval" / f"server-{src.label.replace('@', '-')}.log"
        with src_mod.running_server(src, log_path) as url:
            return evaluate_source(src_mod.server_model(src, url, cfg.batch_size, max_length), tasks, cfg, manager)
    return evaluate_source(src_mod.in_process_model(src, cfg.batch_size, max_length), tasks, cfg, manager)
