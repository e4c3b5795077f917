"""The export stage: the trained model (or an optimize variant) -> a verified, self-contained `onnx/`.

Everything is written into a staged directory that replaces `onnx/` only when the graph passed its
parity check, so `onnx/` is never half-written and never holds an unverified model. The graph
itself (wrapper, exporter, parity) lives in `fastserve_cli.onnx_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastserve_cli.errors import UserError
from fastserve_cli.recipe import ExportConfig, Recipe
from fastserve_cli.rundir import RunDir, StageResult, atomic_write_json, staged_dir


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
        raise UserError(f"export.source {source!r}: no optimize variant of that name; "
                        f"use `model` or one of: {', '.join(names) or '(no variants in the recipe)'}")
    path = run.variant_dir(source)
    if not (path / "config.json").is_file():
        raise UserError(f"export.source {source!r}: {path} holds no PyTorch model (only pruned or torch-quantized "
                        f"variants can be exported); use `model` or a pruning variant")
    return path


def check_writable(run: RunDir) -> None:
    """Fail before any work when the run directory cannot take a new `onnx/`."""
    import os

    parent = run.onnx_dir.parent
    if not os.access(parent, os.W_OK | os.X_OK) or (run.onnx_dir.exists() and not os.access(run.onnx_dir, os.W_OK)):
        raise UserError(f"{run.onnx_dir}: output directory is not writable; fix its permissions or choose another run_dir")


def optimize_graph(out_dir: Path, config) -> dict[str, int]:
    """onnxruntime's transformer optimizer (fusions only, portable across machines); returns fused op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    from fastserve_cli.onnx_model import MODEL_FILE, kv_shape, save_model

    layers, _, head_dim = kv_shape(config)
    heads = config.num_attention_heads
    optimized = optimize_model(str(out_dir / MODEL_FILE), model_type="gpt2", num_heads=heads,
                               hidden_size=heads * head_dim, opt_level=0)
    save_model(optimized.model, out_dir / MODEL_FILE)
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


def build_onnx(cfg: ExportConfig, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Export, then (optionally) optimize; each graph that ends up as model.onnx is parity-checked."""
    from fastserve_cli.onnx_model import OnnxCausalLM, check_parity, export_onnx, load_for_export

    model = load_for_export(model_dir, cfg.fp16)
    parity = export_onnx(model_dir, out_dir, opset=cfg.opset, fp16=cfg.fp16, parity_atol=cfg.parity_atol,
                         parity_steps=cfg.parity_steps, model=model)
    parity["optimized"] = False
    if parity["passed"] and cfg.optimize:
        unoptimized = parity
        fused = optimize_graph(out_dir, model.config)
        parity = check_parity(model, OnnxCausalLM(out_dir), steps=cfg.parity_steps, atol=cfg.parity_atol)
        parity.update({k: unoptimized[k] for k in ("model", "opset", "dtype", "providers")})
        parity.update(optimized=True, fused_operators=fused,
                      unoptimized={k: unoptimized[k] for k in ("passed", "max_abs_diff", "cases")})
    return parity


def run_export(recipe: Recipe, run: RunDir) -> StageResult:
    from fastserve_cli.onnx_model import MODEL_FILE, onnx_size_bytes, parity_failure_message, read_model_type

    cfg = recipe.export
    model_dir = source_dir(recipe, run)
    model_type = read_model_type(model_dir)
    check_writable(run)
    with staged_dir(run.onnx_dir) as out:
        parity = build_onnx(cfg, model_dir, out)
        parity.update(source=cfg.source, model_type=model_type)
        if not parity["passed"]:
            atomic_write_json(run.parity_failed_path, parity)
            raise UserError(parity_failure_message(parity, str(run.parity_failed_path)))
        atomic_write_json(out / run.parity_path.name, parity)
    run.parity_failed_path.unlink(missing_ok=True)
    outputs = sorted(run.rel(p) for p in run.onnx_dir.iterdir() if p.is_file())
    metrics = {"parity_max_abs_diff": parity["max_abs_diff"], "parity_passed": parity["passed"],
               "optimized": parity["optimized"], "size_bytes": onnx_size_bytes(run.onnx_dir / MODEL_FILE),
               "opset": cfg.opset, "dtype": parity["dtype"]}
    return StageResult(outputs=outputs, metrics=metrics)
