"""The eval table: one row per task and metric, one column per source (rich, on stdout)."""

from __future__ import annotations

from typing import Any


def print_results(document: dict[str, Any]) -> None:
    from rich.table import Table

    from fastserve_cli.core.console import format_value, out_console

    sources = document.get("sources", {})
    table = Table(
        title="eval" + (f" (limit {document['limit']:g})" if document.get("limit") else ""), header_style="bold"
    )
    table.add_column("task")
    table.add_column("metric")
    for label in sources:
        table.add_column(label, justify="right")
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for label, entry in sources.items():
        for task, metrics in entry["tasks"].items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr"):
                    rows.setdefault((task, metric), {})[label] = value

    def cell(label: str, task: str, metric: str, values: dict[str, float]) -> str:
        if label not in values:
            return "-"
        delta = sources[label].get("deltas", {}).get(task, {}).get(metric)
        return format_value(values[label]) + ("" if delta is None else f" [dim]({delta:+.3g})[/dim]")

    for (task, metric), values in rows.items():
        table.add_row(task, metric, *(cell(s, task, metric, values) for s in sources))
    out_console().print(table)
    baselines = {e["baseline"] for e in sources.values() if e.get("baseline")}
    if baselines:
        out_console().print(f"[dim](in brackets: the difference to {baselines.pop()})[/dim]")
    for line in document.get("gate_failures", []):
        out_console().print(f"[red]gate failed[/red] {line}")
