"""Which lm-eval tasks a recipe names, and the one-line errors for the ones that cannot run here.

`eval.tasks` entries are lm-eval task (or group) names, or paths to task YAML files / folders of them. Our own
offline tasks live in `fastserve_cli/eval/tasks/` (always on lm-eval's include path). Three things fail before
any model loads, each as one line naming the entry: a name lm-eval does not know, a YAML that does not parse,
and a task whose dataset would have to come from the hub (nothing can be downloaded here).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastserve_cli.core.errors import UserError

BUILTIN_TASKS_DIR = Path(__file__).parent / "tasks"


class _AnyTagLoader(yaml.SafeLoader):
    """Parses task YAMLs for their names only: lm-eval's tags (`!function ...`) become None."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


@dataclass
class TaskPlan:
    names: list[str]  # what lm-eval is asked to run
    include_paths: list[str] = field(default_factory=list)
    needs_defaults: bool = False  # a name that is not ours nor in a given path: lm-eval's own index is needed


def read_task_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise UserError(
            f"eval.tasks: {path}:{where} not valid YAML ({getattr(err, 'problem', None) or err}); fix the task file"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"eval.tasks: {path}: cannot read the task file ({err})") from None
    if not isinstance(data, dict) or not (data.get("task") or data.get("group")):
        raise UserError(f"eval.tasks: {path}: not an lm-eval task file (no `task:` or `group:` key)")
    return data


def _names_in_folder(folder: Path) -> list[str]:
    """Groups defined in the folder, and the tasks no group of it already runs."""
    configs = [read_task_yaml(p) for p in sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml"))]
    groups = [c for c in configs if isinstance(c.get("group"), str) and isinstance(c.get("task"), list)]
    grouped = {t for g in groups for t in g["task"] if isinstance(t, str)}
    tasks = [c["task"] for c in configs if isinstance(c.get("task"), str) and c["task"] not in grouped]
    names = [g["group"] for g in groups] + tasks
    if not names:
        raise UserError(f"eval.tasks: {folder}: no lm-eval task YAML in this folder")
    return names


def _builtin_names() -> set[str]:
    names = set()
    for path in BUILTIN_TASKS_DIR.rglob("*.yaml"):
        data = read_task_yaml(path)
        names.add(data.get("group") if isinstance(data.get("task"), list) else data.get("task"))
    return names


def plan_tasks(entries: list[str]) -> TaskPlan:
    """Split entries into names and include paths; files and folders are read (and checked) here."""
    plan = TaskPlan(names=[], include_paths=[str(BUILTIN_TASKS_DIR)])
    builtin = _builtin_names()
    for entry in entries:
        path = Path(entry).expanduser()
        looks_like_path = entry.endswith((".yaml", ".yml")) or "/" in entry or path.exists()
        if not looks_like_path:
            plan.names.append(entry)
            plan.needs_defaults |= entry not in builtin
            continue
        if path.is_file():
            data = read_task_yaml(path)
            plan.names.append(data["group"] if isinstance(data.get("task"), list) else data["task"])
            folder = str(path.resolve().parent)
        elif path.is_dir():
            plan.names += _names_in_folder(path)
            folder = str(path.resolve())
        else:
            raise UserError(f"eval.tasks: {entry}: no such task file or folder")
        if folder not in plan.include_paths:
            plan.include_paths.append(folder)
    return plan


def task_manager(plan: TaskPlan):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=plan.include_paths, include_defaults=plan.needs_defaults)


def check_names(plan: TaskPlan, manager) -> None:
    known = set(manager.all_tasks)
    for name in plan.names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "list them with `lm-eval ls tasks`"
            raise UserError(f"eval.tasks: unknown task {name!r}; {hint}")


def load_tasks(plan: TaskPlan, manager) -> dict[str, Any]:
    """Build every task once (its dataset included), so a dataset that cannot be had fails here, named."""
    from lm_eval.tasks import get_task_dict

    loaded = {}
    for name in plan.names:
        try:
            loaded[name] = get_task_dict([name], manager)
        except UserError:
            raise
        except Exception as err:  # datasets raises many types for "offline" and "not found"
            raise UserError(_dataset_error(name, manager, err)) from None
    return loaded


def _dataset_error(name: str, manager, err: Exception) -> str:
    config = manager.task_index.get(name) if hasattr(manager, "task_index") else None
    dataset = None
    yaml_path = getattr(config, "yaml_path", None) if config is not None else None
    if isinstance(config, dict):
        yaml_path = config.get("yaml_path")
    if yaml_path and Path(str(yaml_path)).is_file():
        try:
            dataset = read_task_yaml(Path(str(yaml_path))).get("dataset_path")
        except UserError:
            dataset = None
    text = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    offline = any(
        s in text.lower()
        for s in (
            "offline",
            "connection",
            "couldn't reach",
            "not find",
            "doesn't exist",
            "not found",
            "network",
            "resolve",
        )
    )
    if dataset and dataset != "json" and offline:
        return (
            f"eval.tasks: task {name!r} needs the hub dataset {dataset!r}, which cannot be downloaded here; "
            "use a local task (dataset_path: json with data_files) or run where the hub is reachable"
        )
    return f"eval.tasks: task {name!r} could not be loaded: {text}"
