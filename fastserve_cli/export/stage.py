"""The export stage: the trained model (or an optimize variant) -> a verified, self-contained `onnx/`.

Everything is written into a staged directory that replaces `onnx/` only when the graph passed its
parity check, so `onnx/` is never half-written and never holds an unverified model. The graph
itself (wrapper, exporter, parity) lives in `fastserve_cli.models.onnx`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import ExportConfig, Recipe
from fastserve_cli.core.rundir import RunDir, StageResult, atomic_write_json, staged_dir


def source_dir(recipe: Recipe, run: RunDir) -> Path:
    """run.model_dir, or the optimize variant named by export.source (it must be a PyTorch model)."""
    source = recipe.export.source
    if source == "model":
        path = run.model_dir
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: no trained model here; run `fastserve train` first")
        return path
    names = [v.name for v in recipe.optimize.variants]
    if source not in names:
        raise UserError(
            f"export.source {source!r}: no optimize variant of that name; "
            f"use `model` or one of: {', '.join(names) or '(no variants in the recipe)'}"
        )
    path = run.variant_dir(source)
    if not (path / "config.json").is_file():
        raise UserError(
            f"export.source {source!r}: {path} holds no PyTorch model (only pruned or torch-quantized "
            f"variants can be exported); use `model` or a pruning variant"
        )
    return path


@contextlib.contextmanager
def int4_as_dense(model_dir: Path, run: RunDir) -> Iterator[tuple[Path, tuple[dict, int] | None]]:
    """A weight-only int4 (RTN or gptq) variant as a dense fp32 copy holding exactly its int4 weights, plus
    those weights for the int4 graph (models/int4_dense.py); any other directory as it is."""
    import tempfile

    from fastserve_cli.models.int4_dense import int4_group_size_of, write_dense_copy

    group_size = int4_group_size_of(model_dir)
    if group_size is None:
        yield model_dir, None
        return
    with tempfile.TemporaryDirectory(dir=run.root, prefix=".dense-int4-") as tmp:
        exact = write_dense_copy(model_dir, Path(tmp))
        yield Path(tmp), (exact, group_size)


def check_writable(run: RunDir) -> None:
    """Fail before any work when the run directory cannot take a new `onnx/`."""
    import os

    parent = run.onnx_dir.parent
    if not os.access(parent, os.W_OK | os.X_OK) or (run.onnx_dir.exists() and not os.access(run.onnx_dir, os.W_OK)):
        raise UserError(
            f"{run.onnx_dir}: output directory is not writable; fix its permissions or choose another run_dir"
        )


# model_type -> onnxruntime transformer-optimizer type. Architectures onnxruntime has no type for (llama,
# mistral, qwen2) get its generic decoder fusions (SimplifiedLayerNorm/SkipLayerNorm, GELU, bias adds), which
# it implements in the gpt2 optimizer; the fused graph passes the same parity check either way.
ORT_OPTIMIZER_TYPES = {"gpt2": "gpt2", "qwen3": "qwen3"}
GENERIC_DECODER_TYPE = "gpt2"


def optimize_graph(src: Path, dst: Path, model) -> dict[str, int]:
    """onnxruntime's transformer optimizer (fusions only, portable across machines); returns fused op counts.

    Heads and width are the attention's as exported: a head-pruned GPT-2 keeps `n_head` in its config but
    has fewer heads in the graph (kv_shape reads them off a forward)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from fastserve_cli.export.onnx_graph import kv_shape, save_model

    model_type = ORT_OPTIMIZER_TYPES.get(model.config.model_type, GENERIC_DECODER_TYPE)
    _, kv_heads, head_dim = kv_shape(model)
    heads = kv_heads if model.config.model_type == "gpt2" else model.config.num_attention_heads
    optimized = optimize_model(
        str(src), model_type=model_type, num_heads=heads, hidden_size=heads * head_dim, opt_level=0
    )
    save_model(optimized.model, dst)
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


def build_onnx(cfg: ExportConfig, model_dir: Path, out_dir: Path):
    """Export the fp32 (or fp16) graph and check its parity; returns (parity, the PyTorch model)."""
    from fastserve_cli.export.onnx_graph import export_onnx, load_for_export

    model = load_for_export(model_dir, cfg.fp16)
    parity = export_onnx(
        model_dir,
        out_dir,
        opset=cfg.opset,
        fp16=cfg.fp16,
        parity_atol=cfg.parity_atol,
        parity_steps=cfg.parity_steps,
        model=model,
    )
    parity["optimized"] = False
    return parity, model


def optimize_and_check(cfg: ExportConfig, model, out_dir: Path, unoptimized: dict[str, Any]) -> dict[str, Any]:
    """Fuse model.onnx in place and check the fused graph's parity the same way as the plain one."""
    from fastserve_cli.export.onnx_graph import check_parity
    from fastserve_cli.models.onnx import MODEL_FILE, OnnxCausalLM

    fused = optimize_graph(out_dir / MODEL_FILE, out_dir / MODEL_FILE, model)
    parity = check_parity(model, OnnxCausalLM(out_dir), steps=cfg.parity_steps, atol=cfg.parity_atol)
    keep = ("model", "opset", "dtype", "providers", "source", "model_type", "variants")
    parity.update({k: unoptimized[k] for k in keep if k in unoptimized})
    parity.update(
        optimized=True,
        fused_operators=fused,
        unoptimized={k: unoptimized[k] for k in ("passed", "max_abs_diff", "cases")},
    )
    return parity


def measure_row(
    run: RunDir, recipe: Recipe, name: str, path: Path, parameters: int, details: dict[str, Any]
) -> dict[str, Any]:
    """A report row for one graph (perplexity and size; latency is timed for all graphs together)."""
    from fastserve_cli.core.report import make_row
    from fastserve_cli.models.measure import onnx_perplexity, validation_blocks
    from fastserve_cli.models.onnx import OnnxCausalLM, onnx_size_bytes

    ppl = onnx_perplexity(OnnxCausalLM(path), validation_blocks(run, recipe))
    if not np.isfinite(ppl):
        raise UserError(
            f"{path.name}: validation perplexity is not finite, the graph is broken; drop it from export.quantize"
        )
    method = "onnx_export" if name == "onnx_fp32" else name
    return make_row(
        name, method, "onnx", run.rel(run.onnx_dir / path.name), parameters, onnx_size_bytes(path), ppl, None, details
    )


def time_rows(run: RunDir, recipe: Recipe, out: Path, rows: list[dict[str, Any]]) -> None:
    """Decode latency of every graph, timed in interleaved rounds with the trained PyTorch model (the
    report's baseline), so each row's speedup compares figures taken under the same load."""
    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.models.measure import interleaved_decode_ms, latency_workload
    from fastserve_cli.models.onnx import OnnxCausalLM

    models: dict[str, Any] = {row["name"]: OnnxCausalLM(out / Path(row["path"]).name) for row in rows}
    if (run.model_dir / "config.json").is_file():
        models["baseline"] = load_causal_lm(run.model_dir)
    opt = recipe.optimize
    prompt, new_tokens = latency_workload(run, recipe)
    timings = interleaved_decode_ms(models, prompt, new_tokens, opt.latency_repeats)
    for row in rows:
        row["decode_ms_per_token"] = timings[row["name"]]
        row["tokens_per_s"] = 1000.0 / timings[row["name"]]
        if "baseline" in timings:
            row["details"]["baseline_decode_ms"] = timings["baseline"]


def quantize_variants(
    cfg: ExportConfig, run: RunDir, out: Path, vocab_size: int, int4_source: tuple[dict, int] | None = None
) -> dict[str, dict]:
    """Write one quantized graph per export.quantize from the plain fp32 graph; returns their drift checks.

    `int4_source` (the source is a weight-only int4 / gptq variant): its int4 weights and group size, which
    the int4 graph re-emits as they are instead of re-quantizing them."""
    from fastserve_cli.export.onnx_quant import VARIANT_FILES, quantize
    from fastserve_cli.models.measure import calibration_blocks, greedy_agreement
    from fastserve_cli.models.onnx import MODEL_FILE, OnnxCausalLM

    calibration = [b["input_ids"] for b in calibration_blocks(run, cfg.calibration_blocks)]
    reference = OnnxCausalLM(out / MODEL_FILE)
    checks = {}
    for name in cfg.quantize:
        target = out / VARIANT_FILES[name]
        exact: dict = {}
        options = (
            {"exact_weights": int4_source[0], "block_size": int4_source[1], "report": exact} if int4_source else {}
        )
        quantize(
            name, out / MODEL_FILE, target, calibration=calibration, **{"block_size": cfg.int4_block_size, **options}
        )
        checks[name] = greedy_agreement(reference, OnnxCausalLM(target), vocab_size, cfg.parity_steps)
        if name == "int4" and int4_source:
            checks[name].update(block_size=int4_source[1], weights_from_source=exact.get("exact", 0))
    return checks


def measure_rows(recipe: Recipe, run: RunDir, out: Path, model, checks: dict[str, dict], optimized: bool) -> list[dict]:
    """Report rows for model.onnx (as served: fused when export.optimize) and each quantized graph."""
    from fastserve_cli.export.onnx_quant import VARIANT_FILES
    from fastserve_cli.models.onnx import MODEL_FILE

    parameters = sum(p.numel() for p in model.parameters())
    rows = [measure_row(run, recipe, "onnx_fp32", out / MODEL_FILE, parameters, {"optimized": optimized})]
    for name, drift in checks.items():
        rows.append(
            measure_row(run, recipe, f"onnx_{name}", out / VARIANT_FILES[name], parameters, {"drift_vs_fp32": drift})
        )
    time_rows(run, recipe, out, rows)
    return rows


def record_rows(recipe: Recipe, run: RunDir, rows: list[dict]) -> list[str]:
    """Put this export's rows in the optimize report and drop ONNX rows of graphs it no longer has.

    Returns the gate failures of these rows (ratios and gates are computed by `core.report.add_rows`).
    """
    from fastserve_cli.core.report import add_rows, load_report
    from fastserve_cli.export.onnx_quant import VARIANT_FILES
    from fastserve_cli.models.measure import ensure_baseline, measurement_key

    stale = {f"onnx_{n}" for n in ("fp32", *VARIANT_FILES)} - {r["name"] for r in rows}
    existing = {r["name"] for r in (load_report(run) or {}).get("rows", [])}
    if not rows and not stale & existing:
        return []
    ensure_baseline(run, recipe)
    return add_rows(run, recipe, measurement_key(run, recipe), rows, drop=stale & existing)


def track_parity(recipe: Recipe, run: RunDir, metrics: dict[str, Any], parity: dict[str, Any]) -> None:
    """The export's metrics and parity.json to the recipe's trackers (train.report_to)."""
    from fastserve_cli.core.tracking import Trackers

    trackers = Trackers(recipe.train.report_to, recipe.name, "export", run.root)
    try:
        trackers.log(metrics)
        trackers.log_json("parity", parity)
    finally:
        trackers.finish()


def run_export(recipe: Recipe, run: RunDir) -> StageResult:
    from fastserve_cli.export.onnx_graph import parity_failure_message, read_model_config
    from fastserve_cli.models.onnx import MODEL_FILE, onnx_size_bytes

    cfg = recipe.export
    check_writable(run)
    with int4_as_dense(source_dir(recipe, run), run) as (model_dir, int4_source), staged_dir(run.onnx_dir) as out:
        model_type = read_model_config(model_dir)["model_type"]
        parity, model = build_onnx(cfg, model_dir, out)
        parity.update(source=cfg.source, model_type=model_type)
        if not parity["passed"]:
            atomic_write_json(run.parity_failed_path, parity)
            raise UserError(parity_failure_message(parity, str(run.parity_failed_path)))
        if cfg.quantize:  # from the plain graph, before fusions add contrib ops
            parity["variants"] = quantize_variants(cfg, run, out, model.config.vocab_size, int4_source)
        if cfg.optimize:
            parity = optimize_and_check(cfg, model, out, parity)
            if not parity["passed"]:
                atomic_write_json(run.parity_failed_path, parity)
                raise UserError(parity_failure_message(parity, str(run.parity_failed_path)))
        rows = measure_rows(recipe, run, out, model, parity["variants"], cfg.optimize) if cfg.quantize else []
        atomic_write_json(out / run.parity_path.name, parity)
    run.parity_failed_path.unlink(missing_ok=True)
    failures = record_rows(recipe, run, rows)
    outputs = sorted(run.rel(p) for p in run.onnx_dir.iterdir() if p.is_file())
    metrics = {
        "parity_max_abs_diff": parity["max_abs_diff"],
        "parity_passed": parity["passed"],
        "optimized": parity["optimized"],
        "size_bytes": onnx_size_bytes(run.onnx_dir / MODEL_FILE),
        "opset": cfg.opset,
        "dtype": parity["dtype"],
    }
    for row in rows:
        metrics[f"{row['name']}_size_bytes"] = row["size_bytes"]
        metrics[f"{row['name']}_perplexity"] = row["perplexity"]
        metrics[f"{row['name']}_decode_ms_per_token"] = row["decode_ms_per_token"]
    track_parity(recipe, run, metrics, parity)
    if failures:  # onnx/ stays (its fp32 graph is verified); the stage fails on the broken gates
        raise UserError(f"export: {len(failures)} gate(s) broken: {'; '.join(failures)}")
    return StageResult(outputs=[*outputs, run.rel(run.report_path)] if rows else outputs, metrics=metrics)
