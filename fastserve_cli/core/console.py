"""Rich output shared by the commands: progress bars and tables go to stderr, results to stdout."""

from __future__ import annotations

import functools
from typing import Any

from rich.console import Console
from rich.table import Table


@functools.cache
def err_console() -> Console:
    return Console(stderr=True)


@functools.cache
def out_console() -> Console:
    return Console()


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(title: str, metrics: dict[str, Any]) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, format_value(value))
    out_console().print(table)


def manifest_table(run, manifest: dict[str, Any], stage_order: list[str]) -> None:
    """One row per stage, in pipeline order (`stage_order`), then any other stage the manifest holds."""
    table = Table(title=str(run.root), header_style="bold")
    for column, width in (("stage", 10), ("status", 7), ("started", 11), ("duration", 8), ("fingerprint", 11)):
        table.add_column(column, no_wrap=True, min_width=width)
    table.add_column("metrics", overflow="ellipsis", no_wrap=True)
    stages = manifest.get("stages", {})
    for name in [*stage_order, *sorted(set(stages) - set(stage_order))]:
        entry = stages.get(name)
        if entry is None:
            table.add_row(name, "[dim]not run[/dim]", "", "", "", "")
            continue
        status = entry.get("status", "?")
        colour = {"done": "green", "failed": "red", "running": "yellow"}.get(status, "white")
        metrics = entry.get("metrics") or {}
        numeric = [f"{k}={format_value(v)}" for k, v in metrics.items() if isinstance(v, (int, float))]
        shown = "\n".join(numeric[:6] + (["…"] if len(numeric) > 6 else []))
        if status == "failed" and entry.get("error"):
            shown = entry["error"]
        duration = entry.get("duration_s")
        table.add_row(
            name,
            f"[{colour}]{status}[/{colour}]",
            (entry.get("started_at") or "")[5:16].replace("T", " "),
            f"{duration:.1f}s" if isinstance(duration, (int, float)) else "",
            (entry.get("fingerprint") or "")[:8],
            shown,
        )
    out_console().print(table)
