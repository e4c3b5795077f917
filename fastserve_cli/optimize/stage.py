"""The optimize stage: pruned and quantized variants of the trained model, a report, and gates.

Each variant is built from `model/` into `optimized/<name>/` (a staged directory, so a crash leaves the
previous complete variant or nothing), then measured by loading it back with `load_causal_lm` exactly as
`fastserve serve` will. The rows go through `core.report.add_rows`, which applies the recipe's gates; a broken
gate fails the stage after the report is written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import Recipe, VariantConfig
from fastserve_cli.core.rundir import RunDir, StageResult, staged_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

PRUNING = ("magnitude", "structured")
QUANTIZATION = ("dynamic_int8", "weight_only_int8", "weight_only_int4")


def run_optimize(recipe: Recipe, run: RunDir) -> StageResult:
    """Build, save and measure every variant; raise after writing the report when a gate is broken.

    With no variants the report holds the baseline row alone (the quickstart's `fastserve run` path).
    """
    from fastserve_cli.core.report import BASELINE, GateFailure, add_rows, current_report
    from fastserve_cli.models.measure import measurement_key

    check_inputs(recipe, run)
    with quiet_loading():
        base, rows = measure_all(recipe, run)
    wanted = {v.name for v in recipe.optimize.variants} | {BASELINE}
    key = measurement_key(run, recipe)
    stale = {
        r["name"]
        for r in current_report(run, recipe, key)["rows"]
        if r["backend"] == "torch" and r["name"] not in wanted
    }
    failures = add_rows(run, recipe, key, [base, *rows], drop=stale)
    track_report(recipe, run)
    if failures:
        raise GateFailure(f"{len(failures)} gate(s) failed: " + "; ".join(failures) + f" (report: {run.report_path})")
    return StageResult(
        outputs=[run.rel(run.report_path)] + [run.rel(run.variant_dir(v.name)) for v in recipe.optimize.variants],
        metrics=summary_metrics(rows),
    )


def measure_all(recipe: Recipe, run: RunDir) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The baseline row and one row per variant (built here), with latencies timed together at the end."""
    from fastserve_cli.models.measure import ensure_baseline, measure_torch_row, remeasure_latency

    base = ensure_baseline(run, recipe, latency=False)
    rows = []
    for variant in recipe.optimize.variants:
        details = build_variant(recipe, run, variant)
        rows.append(
            measure_torch_row(
                run, recipe, variant.name, variant.method, run.variant_dir(variant.name), details=details, latency=False
            )
        )
    remeasure_latency(run, recipe, [base, *rows])
    return base, rows


def track_report(recipe: Recipe, run: RunDir) -> None:
    """The report's rows as run metrics (`<variant>.<metric>`) and the report itself as an artifact."""
    from fastserve_cli.core.report import load_report
    from fastserve_cli.core.tracking import Trackers

    report = load_report(run)
    trackers = Trackers(recipe.train.report_to, recipe.name, "optimize", run.root)
    try:
        for row in (report or {}).get("rows", []):
            values = {k: row.get(k) for k in ("perplexity", "tokens_per_s", "size_bytes", "parameters")}
            values.update({f"ratio_{k}": v for k, v in row.get("ratios", {}).items()})
            trackers.log({f"{row['name']}.{k}": v for k, v in values.items()})
        if report is not None:
            trackers.log_json("optimize_report", report)
    finally:
        trackers.finish()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar per model load (there are several per variant); restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def summary_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat per-variant ratios for the manifest and `fastserve status`."""
    metrics: dict[str, Any] = {"variants": len(rows)}
    for row in rows:
        for key in ("speedup", "perplexity", "size"):
            value = row["ratios"].get(key) if row.get("ratios") else None
            if value is not None:
                metrics[f"{row['name']}.{key}_ratio" if key != "speedup" else f"{row['name']}.speedup"] = round(
                    value, 4
                )
    return metrics


# ------------------------------------------------------------------ checks before anything is written


def check_inputs(recipe: Recipe, run: RunDir) -> None:
    """Everything that can be wrong with the inputs, checked before the first byte is written."""
    from transformers import AutoConfig

    if not (run.model_dir / "config.json").is_file():
        raise UserError(f"{run.model_dir}: no trained model here; run `fastserve train` first")
    config = AutoConfig.from_pretrained(run.model_dir, trust_remote_code=False)
    for variant in recipe.optimize.variants:
        if variant.name == "baseline" or variant.name.endswith(".json"):
            raise UserError(f"optimize.variants: the name {variant.name!r} is reserved; pick another name")
        if variant.method == "structured":
            check_structured(variant, config)


def check_structured(variant: VariantConfig, config: Any) -> None:
    """Bounds of a structured variant against the model's shape (a meta-device model, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve_cli.optimize.pruning import plan_structured

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        plan_structured(skeleton, variant.heads_fraction, variant.heads_per_layer, variant.neurons_fraction)
    except UserError as err:
        raise UserError(f"optimize.variants[{variant.name}]: {err}".replace("optimize.variants: ", "")) from None


# ------------------------------------------------------------------ building variants


def build_variant(recipe: Recipe, run: RunDir, variant: VariantConfig) -> dict[str, Any]:
    """Write optimized/<name>/ for one variant (from the trained model or its `source` variant); returns
    the details for its report row."""
    from fastserve_cli.models.loader import load_causal_lm

    src = run.variant_dir(variant.source) if variant.source else run.model_dir
    model = load_causal_lm(src)
    with staged_dir(run.variant_dir(variant.name)) as out:
        if variant.method in QUANTIZATION:
            return quantize_variant(model, variant, src, out)
        if variant.method == "gptq":
            return gptq_variant(run, model, variant, src, out)
        if variant.method == "magnitude":
            return magnitude_variant(recipe, run, model, variant, out)
        if variant.method == "structured":
            return structured_variant(recipe, run, model, variant, out)
    raise UserError(f"optimize.variants[{variant.name}].method: unknown method {variant.method!r}")


def quantize_variant(model: "nn.Module", variant: VariantConfig, src: Path, out: Path) -> dict[str, Any]:
    from fastserve_cli.models.quantized import quantize_model, save_quantized

    modules = quantize_model(model, variant.method, variant.group_size)
    extra = {"group_size": variant.group_size} if variant.method == "weight_only_int4" else {}
    save_quantized(model, variant.method, modules, src, out, extra)
    return {"quantized_modules": len(modules), **extra, **({"source": variant.source} if variant.source else {})}


def gptq_variant(run: RunDir, model: "nn.Module", variant: VariantConfig, src: Path, out: Path) -> dict[str, Any]:
    """Calibrated int4 (optimize/gptq.py), saved exactly as a weight_only_int4 variant."""
    from fastserve_cli.models.quantized import save_quantized
    from fastserve_cli.optimize.gptq import DAMP, gptq_model

    modules = gptq_model(model, calibration_batches(run, variant.calibration_blocks), variant.group_size)
    extra = {
        "group_size": variant.group_size,
        "method": "gptq",
        "calibration_blocks": variant.calibration_blocks,
        "damp": DAMP,
    }
    save_quantized(model, "weight_only_int4", modules, src, out, extra)
    return {"quantized_modules": len(modules), **extra, **({"source": variant.source} if variant.source else {})}


def magnitude_variant(
    recipe: Recipe, run: RunDir, model: "nn.Module", variant: VariantConfig, out: Path
) -> dict[str, Any]:
    """Zero the smallest weights; recovery keeps them at zero; the sparsity is re-measured at the end."""
    from fastserve_cli.optimize.pruning import magnitude_prune, measure_sparsity, prunable_linears

    magnitude_prune(model, variant.sparsity or 0.0, variant.scope)
    details: dict[str, Any] = {"target_sparsity": variant.sparsity, "scope": variant.scope}
    if variant.recovery_steps:
        masks = {name: m.weight != 0 for name, m in prunable_linears(model).items()}
        details["recovery_loss"] = recover(recipe, run, model, variant.recovery_steps, masks)
    achieved = measure_sparsity(model)
    if achieved["sparsity"] + 1e-3 < (variant.sparsity or 0.0):
        raise UserError(
            f"optimize.variants[{variant.name}]: achieved sparsity {achieved['sparsity']:.4f} is below the target "
            f"{variant.sparsity}; this is a bug, please report it"
        )
    save_hf(model, run.model_dir, out)
    return {**details, **{k: round(v, 6) for k, v in achieved.items()}}


def structured_variant(
    recipe: Recipe, run: RunDir, model: "nn.Module", variant: VariantConfig, out: Path
) -> dict[str, Any]:
    """Rank heads/neurons, remove the lowest of every layer, optionally fine-tune, save a plain HF dir."""
    from fastserve_cli.optimize.pruning import (
        calibrated_importance,
        plan_structured,
        prune_structured,
        weight_importance,
    )

    plan = plan_structured(model, variant.heads_fraction, variant.heads_per_layer, variant.neurons_fraction)
    if variant.importance == "weight":
        heads, neurons = weight_importance(model)
    else:
        heads, neurons = calibrated_importance(
            model, calibration_batches(run, variant.calibration_blocks), variant.importance
        )
    before = sum(p.numel() for p in model.parameters())
    details = prune_structured(model, plan, heads, neurons)
    details.update(
        importance=variant.importance,
        parameters_removed_fraction=round(1 - sum(p.numel() for p in model.parameters()) / before, 6),
    )
    if variant.recovery_steps:
        details["recovery_loss"] = recover(recipe, run, model, variant.recovery_steps)
    save_hf(model, run.model_dir, out)
    return details


def save_hf(model: "nn.Module", src: Path, out: Path) -> None:
    """save_pretrained (safetensors) plus the trained model's tokenizer and generation config."""
    from fastserve_cli.models.quantized import copy_side_files

    model.save_pretrained(out)
    copy_side_files(src, out)


def calibration_batches(run: RunDir, count: int) -> list[dict[str, "torch.Tensor"]]:
    """Validation blocks as single-row batches with labels (for activation/gradient importance)."""
    import torch

    from fastserve_cli.models.measure import calibration_blocks

    return [{k: torch.tensor([v]) for k, v in block.items()} for block in calibration_blocks(run, count)]


# ------------------------------------------------------------------ recovery fine-tune


def recover(
    recipe: Recipe, run: RunDir, model: "nn.Module", steps: int, masks: dict[str, "torch.Tensor"] | None = None
) -> float:
    """A short fine-tune with the train stage's optimizer, schedule and batches; returns the last loss.

    `masks` (magnitude pruning) are re-applied after every step so pruned weights stay exactly zero.
    """
    import torch

    from fastserve_cli.core.batches import BatchStream, load_splits
    from fastserve_cli.models.optim import make_optimizer, make_scheduler
    from fastserve_cli.optimize.pruning import prunable_linears

    cfg = recipe.train.model_copy(
        update={"max_steps": steps, "warmup_steps": min(recipe.train.warmup_steps, steps // 10)}
    )
    train_split, _ = load_splits(run.data_dir)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    stream = BatchStream(train_split, cfg.per_device_train_batch_size, recipe.seed + 1, pad_id=pad_id)
    optimizer, scheduler = make_optimizer(model, cfg, fused=False), None
    scheduler = make_scheduler(optimizer, cfg)
    layers = prunable_linears(model)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        for _ in range(cfg.gradient_accumulation_steps):
            loss = model(**stream.next()).loss / cfg.gradient_accumulation_steps
            loss.backward()
            loss_value = loss.item() * cfg.gradient_accumulation_steps
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if masks:
            with torch.no_grad():
                for name, mask in masks.items():
                    layers[name].weight.mul_(mask)
    model.eval()
    return round(loss_value, 6)
