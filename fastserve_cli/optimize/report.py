"""The optimize report (`optimized/report.json`): one row per model variant, ratios to a baseline, gates.

Row: {name, method, backend ("torch"|"onnx"), path (relative to the run dir), parameters, size_bytes,
perplexity, decode_ms_per_token, tokens_per_s, ratios: {size, perplexity, speedup}, gates: {passed,
failures}, details: {...}}. Other stages (the ONNX export) add their rows with `add_rows`.

Measurement definitions, so any backend can reproduce them:
- perplexity: the first `optimize.eval_blocks` rows of the validation split (`validation_blocks`); each
  block is run whole, position t predicts labels[t+1], labels == -100 are skipped; perplexity =
  exp(total NLL / number of predicted tokens) over all blocks (`nll_sum` on the logits).
- decode latency: batch 1, greedy, KV cache. The prompt is the first `optimize.latency_prompt_tokens`
  tokens of the validation split (`latency_prompt`); after the prefill, `optimize.latency_new_tokens - 1`
  single-token decode steps are timed one by one (EOS ignored). decode_ms_per_token is the lowest, over
  `optimize.latency_repeats` runs after one warm-up run, of a run's median step time (the median keeps
  a shared CPU's scheduling hiccups out); tokens_per_s = 1000 / decode_ms_per_token. The optimize stage
  times the baseline and all its variants in interleaved rounds (one run of each per round), so a load
  change on a shared machine hits them alike.
- size_bytes: bytes of the weight files of the variant (*.safetensors, *.onnx, external data); the
  tokenizer and configs are the same for every variant and are not counted.
- ratios: variant / baseline for size and perplexity, baseline ms / variant ms for speedup.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import GatesConfig, Recipe
from fastserve_cli.core.rundir import RunDir, atomic_write_json, now_iso, read_json

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

REPORT_VERSION = 1
BASELINE = "baseline"
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".data", ".bin")


class GateFailure(UserError):
    """One or more variants broke a recipe gate; the report is already written."""


# ------------------------------------------------------------------ measurement inputs


def _validation_split(run: RunDir):
    from datasets import load_from_disk

    if not run.data_dir.is_dir():
        raise UserError(f"{run.data_dir}: no preprocessed data here; run `fastserve preprocess` first")
    data = load_from_disk(str(run.data_dir))
    if "validation" not in data or len(data["validation"]) == 0:
        raise UserError(f"{run.data_dir}: the validation split is missing or empty; raise data.validation_fraction and re-run preprocess")
    return data["validation"]


def _block(row: dict[str, Any]) -> dict[str, list[int]]:
    labels = row.get("labels") or list(row["input_ids"])
    mask = row.get("attention_mask") or [1] * len(row["input_ids"])
    return {"input_ids": list(row["input_ids"]), "labels": list(labels), "attention_mask": list(mask)}


def validation_blocks(run: RunDir, recipe: Recipe) -> list[dict[str, list[int]]]:
    """The blocks perplexity is measured on: the first `optimize.eval_blocks` validation rows."""
    split = _validation_split(run)
    return [_block(split[i]) for i in range(min(recipe.optimize.eval_blocks, len(split)))]


def calibration_blocks(run: RunDir, count: int) -> list[dict[str, list[int]]]:
    """Blocks for activation/gradient importance: the last `count` validation rows (away from the eval ones)."""
    split = _validation_split(run)
    return [_block(split[i]) for i in range(max(0, len(split) - count), len(split))]


def latency_prompt(run: RunDir, recipe: Recipe) -> list[int]:
    """The decode benchmark's prompt: the first `optimize.latency_prompt_tokens` validation tokens."""
    tokens: list[int] = []
    split = _validation_split(run)
    for i in range(len(split)):
        tokens += [t for t, m in zip(split[i]["input_ids"], _block(split[i])["attention_mask"]) if m]
        if len(tokens) >= recipe.optimize.latency_prompt_tokens:
            break
    return tokens[: recipe.optimize.latency_prompt_tokens]


def nll_sum(logits: "torch.Tensor", labels: "torch.Tensor") -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens (labels -100 skipped)."""
    import torch.nn.functional as F

    shifted = labels[:, 1:]
    count = int((shifted != -100).sum())
    if count == 0:
        return 0.0, 0
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return float(loss), count


def torch_perplexity(model: "nn.Module", blocks: list[dict[str, list[int]]], batch_size: int = 4) -> float:
    """exp(mean NLL) over the blocks (batched when consecutive blocks have equal length)."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        i = 0
        while i < len(blocks):
            length = len(blocks[i]["input_ids"])
            batch = [blocks[i]]
            while len(batch) < batch_size and i + len(batch) < len(blocks) and len(blocks[i + len(batch)]["input_ids"]) == length:
                batch.append(blocks[i + len(batch)])
            i += len(batch)
            tensors = {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
            nll, n = nll_sum(logits, tensors["labels"])
            total, count = total + nll, count + n
    if count == 0:
        raise UserError("optimize: the validation blocks have no tokens with labels; check the preprocess output")
    return math.exp(min(total / count, 700.0))


def cache_keyword(model: "nn.Module") -> str:
    """transformers 5.2x renames forward's `past_key_values` to `cache`; use whichever this one takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    return out["cache"] if "cache" in out else out.past_key_values


def decode_run_ms(model: "nn.Module", prompt: list[int], new_tokens: int) -> float:
    """One greedy run at batch 1: prefill, then `new_tokens - 1` timed decode steps; the median step in ms."""
    import statistics

    import torch

    if not prompt:
        raise UserError("optimize: no validation tokens for the latency prompt; check the preprocess output")
    cache_arg = cache_keyword(model)
    steps = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(max(1, new_tokens - 1)):
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{cache_arg: past})
            past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
    return statistics.median(steps) * 1000.0


def torch_decode_ms(model: "nn.Module", prompt: list[int], new_tokens: int, repeats: int = 3) -> float:
    """ms per greedy decode step at batch 1 after the prefill (KV cache): the best over `repeats` runs
    (after one warm-up) of each run's median step time; medians keep a shared CPU's hiccups out."""
    return interleaved_decode_ms({"model": model}, prompt, new_tokens, repeats)["model"]


def interleaved_decode_ms(models: dict[str, "nn.Module"], prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """`torch_decode_ms` of several models in rounds (one run of each per round, after a warm-up of each),
    so a change of load on a shared CPU hits every model alike and the ratios stay fair."""
    for model in models.values():
        decode_run_ms(model, prompt, new_tokens)
    best = {name: math.inf for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            best[name] = min(best[name], decode_run_ms(model, prompt, new_tokens))
    return best


def remeasure_latency(run: RunDir, recipe: Recipe, rows: list[dict[str, Any]]) -> None:
    """Re-time the torch rows' models together with `interleaved_decode_ms` and update the rows in place."""
    from fastserve_cli.models.quantized import load_causal_lm

    models = {row["name"]: load_causal_lm(run.root / row["path"]) for row in rows if row["backend"] == "torch"}
    opt = recipe.optimize
    timings = interleaved_decode_ms(models, latency_prompt(run, recipe), opt.latency_new_tokens, opt.latency_repeats)
    for row in rows:
        if row["name"] in timings:
            row["decode_ms_per_token"] = timings[row["name"]]
            row["tokens_per_s"] = 1000.0 / timings[row["name"]]
            row["details"]["latency"] = f"interleaved with {len(timings) - 1} other model(s)"


# ------------------------------------------------------------------ sizes


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files in a model directory (tokenizer and configs excluded)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES))


def parameter_count(model: "nn.Module") -> int:
    """Logical parameters: trainable tensors (shared ones once) plus the weights of quantized layers."""
    from fastserve_cli.models.quantized import _QuantLinear

    count = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, _QuantLinear):
            count += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    return count


def linear_weight_bytes(model: "nn.Module") -> int:
    """Bytes the linear layers' weights (lm_head included) take in memory: fp32, int8 + scales, or int4."""
    from fastserve_cli.models.quantized import _QuantLinear, linear_modules

    total = sum(m.weight.numel() * m.weight.element_size() for m in linear_modules(model).values())
    for module in model.modules():
        if isinstance(module, _QuantLinear):
            total += sum(t.numel() * t.element_size() for t in module.saved_tensors().values())
    return total


# ------------------------------------------------------------------ rows


def make_row(name: str, method: str, backend: str, path: str, parameters: int | None, size_bytes: int | None,
             perplexity: float | None, decode_ms_per_token: float | None, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A report row in the shared shape; ratios and gates are filled in by `add_rows`."""
    if backend not in ("torch", "onnx"):
        raise ValueError(f"backend must be torch or onnx, got {backend!r}")
    return {
        "name": name, "method": method, "backend": backend, "path": path, "parameters": parameters,
        "size_bytes": size_bytes, "perplexity": perplexity, "decode_ms_per_token": decode_ms_per_token,
        "tokens_per_s": (1000.0 / decode_ms_per_token) if decode_ms_per_token else None,
        "ratios": {}, "gates": {"passed": True, "failures": []}, "details": details or {},
    }


def measure_torch_row(run: RunDir, recipe: Recipe, name: str, method: str, path: Path,
                      model: "nn.Module | None" = None, details: dict[str, Any] | None = None,
                      latency: bool = True) -> dict[str, Any]:
    """Load `path` with `load_causal_lm` (what serve does) unless a model is given, then measure it
    (latency left None when `latency` is False: the caller times several models together)."""
    from fastserve_cli.models.quantized import load_causal_lm

    model = model if model is not None else load_causal_lm(path)
    perplexity = torch_perplexity(model, validation_blocks(run, recipe))
    opt = recipe.optimize
    ms = torch_decode_ms(model, latency_prompt(run, recipe), opt.latency_new_tokens, opt.latency_repeats) if latency else None
    extra = {"linear_weight_bytes": linear_weight_bytes(model), **(details or {})}
    return make_row(name, method, "torch", run.rel(path), parameter_count(model), weight_bytes(path), perplexity, ms, extra)


# ------------------------------------------------------------------ the report file


def measurement_key(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    """What the rows were measured against; a report with a different key is stale and started afresh."""
    import torch

    train = run.stage("train") or {}
    opt = recipe.optimize
    return {"train_run_id": train.get("run_id"), "eval_blocks": opt.eval_blocks,
            "latency_prompt_tokens": opt.latency_prompt_tokens, "latency_new_tokens": opt.latency_new_tokens,
            "torch_threads": torch.get_num_threads()}


def load_report(run: RunDir) -> dict[str, Any] | None:
    if not run.report_path.is_file():
        return None
    try:
        report = read_json(run.report_path)
    except ValueError:
        return None
    return report if isinstance(report, dict) and report.get("version") == REPORT_VERSION else None


def _fresh_report(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    return {"version": REPORT_VERSION, "measurement": measurement_key(run, recipe), "updated_at": now_iso(), "rows": []}


def current_report(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    """The report on disk if it was measured against the same model and settings, else an empty one."""
    report = load_report(run)
    if report is None or report.get("measurement") != measurement_key(run, recipe):
        return _fresh_report(run, recipe)
    return report


def find_row(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((row for row in report["rows"] if row["name"] == name), None)


def ensure_baseline(run: RunDir, recipe: Recipe, latency: bool = True) -> dict[str, Any]:
    """The baseline row (the trained model), measured and written unless a current report has it.

    `latency=False`: the caller times the baseline itself (optimize, interleaved with its variants) and
    writes the row; timing it here too would be thrown away.
    """
    report = current_report(run, recipe)
    row = find_row(report, BASELINE)
    if row is not None:
        return row
    if not (run.model_dir / "config.json").is_file():
        raise UserError(f"{run.model_dir}: no trained model here; run `fastserve train` first")
    row = measure_torch_row(run, recipe, BASELINE, "none", run.model_dir, latency=latency)
    if latency:
        report["rows"] = [row] + [r for r in report["rows"] if r["name"] != BASELINE]
        _finish(run, recipe, report)
    return row


def ratios(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    def div(a: Any, b: Any) -> float | None:
        return (a / b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    out = {"size": div(row.get("size_bytes"), base.get("size_bytes")),
           "perplexity": div(row.get("perplexity"), base.get("perplexity")),
           "speedup": div(base.get("decode_ms_per_token"), row.get("decode_ms_per_token"))}
    linear = div(row.get("details", {}).get("linear_weight_bytes"), base.get("details", {}).get("linear_weight_bytes"))
    if linear is not None:
        out["linear_size"] = linear
    return out


# gate -> (ratio it bounds, broken(value, bound), "value vs bound" text, measured-value text)
GATES: dict[str, tuple[str, Any, Any, Any]] = {
    "max_perplexity_increase": ("perplexity", lambda v, b: v - 1.0 > b,
                                lambda v, b: f"perplexity +{v - 1:.2%} > bound +{b:.2%}",
                                lambda row: f"measured {row['perplexity']:.4g}"),
    "min_speedup": ("speedup", lambda v, b: v < b,
                    lambda v, b: f"speedup {v:.3g}x < bound {b:g}x",
                    lambda row: f"measured {row['tokens_per_s']:.4g} tokens/s"),
    "max_size_ratio": ("size", lambda v, b: v > b,
                       lambda v, b: f"size ratio {v:.3g} > bound {b:g}",
                       lambda row: f"measured {row['size_bytes']} bytes"),
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


def _finish(run: RunDir, recipe: Recipe, report: dict[str, Any]) -> list[str]:
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


def add_rows(run: RunDir, recipe: Recipe, rows: list[dict[str, Any]], drop: set[str] | None = None) -> list[str]:
    """Merge rows into the report by name (replacing same-named ones), drop the rows named in `drop`,
    recompute ratios against the baseline row, apply `recipe.gates`, write atomically.

    Returns the gate failures of the rows passed in (so one stage does not fail on another's rows).
    """
    if not rows and not drop:
        return []
    report = current_report(run, recipe)
    if find_row(report, BASELINE) is None and not any(r["name"] == BASELINE for r in rows):
        ensure_baseline(run, recipe)
        report = current_report(run, recipe)
    names = {r["name"] for r in rows} | (drop or set())
    report["rows"] = [r for r in report["rows"] if r["name"] not in names] + list(rows)
    report["rows"].sort(key=lambda r: r["name"] != BASELINE)
    _finish(run, recipe, report)
    return [f for row in report["rows"] if row["name"] in {r["name"] for r in rows} for f in row["gates"]["failures"]]


# ------------------------------------------------------------------ display


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    """The report as a rich table on stdout."""
    from rich import box
    from rich.table import Table

    from fastserve_cli.core.console import out_console

    table = Table(title="optimize report (x = ratio to baseline)", header_style="bold", box=box.SIMPLE_HEAD, show_edge=False,
                  padding=0, pad_edge=False, collapse_padding=True)
    for column in ("variant", "method", "params", "MB", "ppl", "tok/s", "size x", "ppl x", "speed x", "gates"):
        left = column in ("variant", "method", "gates")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for row in report.get("rows", []):
        r = row.get("ratios", {})
        gate = "[green]pass[/green]" if row["gates"]["passed"] else "[red]FAIL[/red]"
        size, params = row.get("size_bytes"), row.get("parameters")
        method = row["method"] if row["backend"] == "torch" else f"{row['method']} (onnx)"
        table.add_row(
            row["name"], method, _fmt(params / 1e6 if params is not None else None, ".3g") + "M",
            _fmt(size / 1e6 if size is not None else None, ".3g"), _fmt(row.get("perplexity"), ".4g"),
            _fmt(row.get("tokens_per_s"), ".4g"),
            _fmt(r.get("size"), ".3f"), _fmt(r.get("perplexity"), ".4f"), _fmt(r.get("speedup"), ".2f"), gate,
        )
    out_console().print(table)
