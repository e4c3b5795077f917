"""The optimize report (`optimized/report.json`): one row per model variant, ratios to a baseline, gates.

Row: {name, method, backend ("torch"|"onnx"), path (relative to the run dir), parameters, size_bytes,
perplexity, decode_ms_per_token, tokens_per_s, ratios: {size, perplexity, speedup}, gates: {passed,
failures}, details: {...}}. The optimize stage writes the baseline and its variants; the export stage
adds its ONNX rows with `add_rows`. How rows are measured: `fastserve_cli.models.measure`.
ratios: variant / baseline for size and perplexity, baseline ms / variant ms for speedup; a row timed
in the same interleaved rounds as the baseline carries that baseline time (`details.baseline_decode_ms`)
and its speedup uses it.
"""

from __future__ import annotations

from typing import Any

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import GatesConfig, Recipe
from fastserve_cli.core.rundir import RunDir, atomic_write_json, now_iso, read_json

REPORT_VERSION = 1
BASELINE = "baseline"


class GateFailure(UserError):
    """One or more variants broke a recipe gate; the report is already written."""


def make_row(
    name: str,
    method: str,
    backend: str,
    path: str,
    parameters: int | None,
    size_bytes: int | None,
    perplexity: float | None,
    decode_ms_per_token: float | None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A report row in the shared shape; ratios and gates are filled in by `add_rows`."""
    if backend not in ("torch", "onnx"):
        raise ValueError(f"backend must be torch or onnx, got {backend!r}")
    return {
        "name": name,
        "method": method,
        "backend": backend,
        "path": path,
        "parameters": parameters,
        "size_bytes": size_bytes,
        "perplexity": perplexity,
        "decode_ms_per_token": decode_ms_per_token,
        "tokens_per_s": (1000.0 / decode_ms_per_token) if decode_ms_per_token else None,
        "ratios": {},
        "gates": {"passed": True, "failures": []},
        "details": details or {},
    }


def load_report(run: RunDir) -> dict[str, Any] | None:
    if not run.report_path.is_file():
        return None
    try:
        report = read_json(run.report_path)
    except ValueError:
        return None
    return report if isinstance(report, dict) and report.get("version") == REPORT_VERSION else None


def _fresh_report(key: dict[str, Any]) -> dict[str, Any]:
    return {"version": REPORT_VERSION, "measurement": key, "updated_at": now_iso(), "rows": []}


def current_report(run: RunDir, recipe: Recipe, key: dict[str, Any]) -> dict[str, Any]:
    """The report on disk if it was measured against the same model and settings, else an empty one."""
    report = load_report(run)
    if report is None or report.get("measurement") != key:
        return _fresh_report(key)
    return report


def find_row(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((row for row in report["rows"] if row["name"] == name), None)


def ratios(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    def div(a: Any, b: Any) -> float | None:
        return (a / b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    out = {
        "size": div(row.get("size_bytes"), base.get("size_bytes")),
        "perplexity": div(row.get("perplexity"), base.get("perplexity")),
        "speedup": div(
            row.get("details", {}).get("baseline_decode_ms", base.get("decode_ms_per_token")),
            row.get("decode_ms_per_token"),
        ),
    }
    linear = div(row.get("details", {}).get("linear_weight_bytes"), base.get("details", {}).get("linear_weight_bytes"))
    if linear is not None:
        out["linear_size"] = linear
    return out


GATES: dict[str, tuple[str, Any, Any, Any]] = {
    "max_perplexity_increase": (
        "perplexity",
        lambda v, b: v - 1.0 > b,
        lambda v, b: f"perplexity +{v - 1:.2%} > bound +{b:.2%}",
        lambda row: f"measured {row['perplexity']:.4g}",
    ),
    "min_speedup": (
        "speedup",
        lambda v, b: v < b,
        lambda v, b: f"speedup {v:.3g}x < bound {b:g}x",
        lambda row: f"measured {row['tokens_per_s']:.4g} tokens/s",
    ),
    "max_size_ratio": (
        "size",
        lambda v, b: v > b,
        lambda v, b: f"size ratio {v:.3g} > bound {b:g}",
        lambda row: f"measured {row['size_bytes']} bytes",
    ),
}


def gate_failures(row: dict[str, Any], gates: GatesConfig) -> list[str]:
    """One message per broken gate: the gate, its bound and the measured value."""
    failures = []
    for gate, (ratio, broken, compare, measured) in GATES.items():
        bound = getattr(gates, gate)
        if bound is None:
            continue
        value = row["ratios"].get(ratio)
        if value is None:
            failures.append(f"{row['name']}: gates.{gate}: {ratio} was not measured")
        elif broken(value, bound):
            failures.append(f"{row['name']}: gates.{gate}: {compare(value, bound)} ({measured(row)})")
    return failures


def finish_report(run: RunDir, recipe: Recipe, report: dict[str, Any]) -> list[str]:
    """Recompute ratios and gates for every row, write atomically; returns all gate failures."""
    base = find_row(report, BASELINE)
    failures: list[str] = []
    for row in report["rows"]:
        row["ratios"] = ratios(row, base) if base else {}
        found = [] if row["name"] == BASELINE or base is None else gate_failures(row, recipe.gates)
        row["gates"] = {"passed": not found, "failures": found}
        failures += found
    report["gates"] = recipe.gates.model_dump(mode="json")
    report["updated_at"] = now_iso()
    atomic_write_json(run.report_path, report)
    return failures


def add_rows(
    run: RunDir, recipe: Recipe, key: dict[str, Any], rows: list[dict[str, Any]], drop: set[str] | None = None
) -> list[str]:
    """Merge rows into the report by name (replacing same-named ones), drop the rows named in `drop`,
    recompute ratios against the baseline row, apply `recipe.gates`, write atomically.

    `key` is what the rows were measured against (`measure.measurement_key`); the caller makes sure the
    baseline row is in the report (`measure.ensure_baseline`) or among `rows`.
    Returns the gate failures of the rows passed in (so one stage does not fail on another's rows).
    """
    if not rows and not drop:
        return []
    report = current_report(run, recipe, key)
    if find_row(report, BASELINE) is None and not any(r["name"] == BASELINE for r in rows):
        raise UserError(f"{run.report_path}: no baseline row to compare with; run `fastserve optimize` first")
    names = {r["name"] for r in rows} | (drop or set())
    report["rows"] = [r for r in report["rows"] if r["name"] not in names] + list(rows)
    report["rows"].sort(key=lambda r: r["name"] != BASELINE)
    finish_report(run, recipe, report)
    return [f for row in report["rows"] if row["name"] in {r["name"] for r in rows} for f in row["gates"]["failures"]]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    """The report as a rich table on stdout."""
    from rich import box
    from rich.table import Table

    from fastserve_cli.core.console import out_console

    table = Table(
        title="optimize report (x = ratio to baseline)",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("variant", "method", "params", "MB", "ppl", "tok/s", "size x", "ppl x", "speed x", "gates"):
        left = column in ("variant", "method", "gates")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for row in report.get("rows", []):
        r = row.get("ratios", {})
        gate = "[green]pass[/green]" if row["gates"]["passed"] else "[red]FAIL[/red]"
        size, params = row.get("size_bytes"), row.get("parameters")
        method = row["method"] if row["backend"] == "torch" else f"{row['method']} (onnx)"
        table.add_row(
            row["name"],
            method,
            _fmt(params / 1e6 if params is not None else None, ".3g") + "M",
            _fmt(size / 1e6 if size is not None else None, ".3g"),
            _fmt(row.get("perplexity"), ".4g"),
            _fmt(row.get("tokens_per_s"), ".4g"),
            _fmt(r.get("size"), ".3f"),
            _fmt(r.get("perplexity"), ".4f"),
            _fmt(r.get("speedup"), ".2f"),
            gate,
        )
    out_console().print(table)
