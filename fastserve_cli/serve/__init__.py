"""fastserve serve: OpenAI-compatible HTTP server over a continuous-batching engine.

Layers, each testable alone: api.py (HTTP + OpenAI protocol) -> engine.py (background loop) ->
scheduler.py (which requests run each iteration) -> kv_cache.py (memory budget, host offload) ->
backends.py (torch or onnxruntime model execution). Nothing heavy is imported here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastserve_cli.core.errors import UserError

# Longer than clients' pool expiry (httpx: 5 s, uvicorn's default too): a server closing an idle connection
# at the same moment a client reuses it shows up as a ReadError under load.
KEEP_ALIVE_S = 65


@dataclass
class ServeTarget:
    """What to serve: the model directory, the backend for it, a default name, and the run dir if any."""

    model_dir: Path
    backend: str
    name: str
    run_dir: Path | None = None


def resolve_target(target: str | Path, backend: str | None, source: str | None, recipe=None) -> ServeTarget:
    """TARGET is a run directory (or a recipe naming one) plus `source`, or a model/ONNX directory."""
    from fastserve_cli.core.rundir import RunDir

    path = Path(target)
    if recipe is not None:
        run = RunDir(recipe.run_dir)
        source = source or recipe.serve.source
        backend = backend or recipe.serve.backend
        if source == "onnx" or (backend == "onnx" and source == "model"):
            model_dir, backend = run.onnx_dir, "onnx"
        elif source == "model":
            model_dir = run.model_dir
        else:
            model_dir = run.variant_dir(source)
            backend = "onnx" if (model_dir / "model.onnx").is_file() else backend
        if not (model_dir / "config.json").is_file():
            raise UserError(
                f"{model_dir}: nothing to serve for source '{source}' (no config.json); run the stage that "
                "writes it (train, optimize or export) or pick another --source"
            )
        return ServeTarget(model_dir, backend, recipe.serve.model_name or recipe.name, run.root)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory, model directory or recipe file")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json) nor a run directory (no recipe.yaml)")
    has_onnx = (path / "model.onnx").is_file()
    if backend is None:
        backend = "onnx" if has_onnx and not (path / "model.safetensors").is_file() else "torch"
    if backend == "onnx" and not has_onnx:
        raise UserError(f"{path}: --backend onnx needs model.onnx here; pass the export stage's onnx/ directory")
    return ServeTarget(path.resolve(), backend, path.resolve().name)


def build_engine(target: ServeTarget, cfg) -> "object":
    """Load the backend and tokenizer and wire scheduler, KV manager, metrics and engine (slow: model load)."""
    from fastserve_cli.core.tokenizer import load_tokenizer
    from fastserve_cli.serve.backends import load_backend
    from fastserve_cli.serve.engine import Engine
    from fastserve_cli.serve.handling import Loaded
    from fastserve_cli.serve.kv_cache import KVCacheManager, parse_bytes
    from fastserve_cli.serve.metrics import Metrics
    from fastserve_cli.serve.scheduler import make_scheduler

    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    backend = load_backend(target.backend, target.model_dir, cfg.num_threads, cfg.fast_kernels, cfg.dtype)
    tokenizer = load_tokenizer(target.model_dir)
    budget = parse_bytes(cfg.kv_cache_memory)
    prefix = None
    if cfg.prefix_cache:
        from fastserve_cli.serve.prefix_cache import make_prefix_cache

        prefix = make_prefix_cache(backend, budget, cfg.prefix_cache_block_size, cfg.prefix_cache_fraction)
    kv = KVCacheManager(backend, budget, parse_bytes(cfg.kv_offload_memory, "--kv-offload-memory"), prefix)
    options = {
        "starvation_s": cfg.starvation_s,
        "base_quantum_s": cfg.base_quantum_s,
        "num_levels": cfg.mlfq_levels,
        "max_batch_size": cfg.max_batch_size,
        "token_budget": cfg.max_num_batched_tokens,
    }
    chunk = cfg.prefill_chunk_tokens
    if cfg.scheduler != "fcfs" or chunk == "auto":
        from fastserve_cli.core.rundir import RunDir
        from fastserve_cli.serve.profile import ensure_profile

        path = RunDir(target.run_dir).serve_profile_path if target.run_dir else None
        profile = ensure_profile(backend, path, cfg.max_batch_size)
        if chunk == "auto":
            chunk = profile.chunk_tokens(cfg.max_num_batched_tokens)
            logging.getLogger("fastserve.serve").info("prefill chunks of %d tokens (auto)", chunk)
    if cfg.scheduler != "fcfs":
        options.update(
            base_quantum_s=cfg.base_quantum_s or profile.base_quantum_s,
            estimate_prefill_s=profile.prefill_s,
            profile_path=path,
        )
    scheduler = make_scheduler(cfg.scheduler, **options)
    engine = Engine(
        backend,
        scheduler,
        kv,
        tokenizer,
        Metrics(cfg.model_name or target.name),
        max_batch_size=cfg.max_batch_size,
        token_budget=cfg.max_num_batched_tokens,
        max_queue=cfg.max_queue,
        prefill_chunk_tokens=chunk,
    )
    return Loaded(engine, tokenizer, backend.max_context, backend.kv_bytes_per_token, budget)


def check_config(cfg) -> None:
    """Fail fast on a bad size or scheduler, before any socket, model or Ray instance."""
    from fastserve_cli.serve.kv_cache import parse_bytes
    from fastserve_cli.serve.scheduler import SCHEDULER_MODULES

    parse_bytes(cfg.kv_cache_memory)
    if cfg.scheduler not in SCHEDULER_MODULES:
        raise UserError(f"--scheduler {cfg.scheduler}: unknown; choose one of: {', '.join(SCHEDULER_MODULES)}")


def http_server(state, cfg):
    """The uvicorn server over our app, as the single process and the cluster ingress both run it (with the
    request log when serve.log_requests is set)."""
    import uvicorn

    from fastserve_cli.serve.api import create_app

    if cfg.log_requests:
        from fastserve_cli.serve.feedback import RequestLog

        state.request_log = RequestLog(cfg.log_requests)
    config = uvicorn.Config(
        create_app(state),
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        timeout_graceful_shutdown=cfg.shutdown_timeout_s,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    return uvicorn.Server(config)


def serve(target: ServeTarget, cfg) -> None:
    """Run the HTTP server until SIGTERM/SIGINT (graceful: in-flight requests get `shutdown_timeout_s`).

    With serve.replicas > 1 (or autoscaling, or a Ray address) the engines run as Ray Serve replicas
    behind this same API: see serve/cluster/."""
    from fastserve_cli.serve.api import ServerState
    from fastserve_cli.serve.cluster import serve_cluster, uses_cluster

    if uses_cluster(cfg):
        return serve_cluster(target, cfg)
    check_config(cfg)
    api_key = cfg.api_key or os.environ.get("FASTSERVE_API_KEY") or None
    state = ServerState(
        cfg.model_name or target.name, api_key, lambda: build_engine(target, cfg), cfg.shutdown_timeout_s
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = http_server(state, cfg)
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.load_error is not None:
        err = state.load_error
        raise err if isinstance(err, UserError) else UserError(f"serve: loading {target.model_dir} failed: {err}")


def serve_config(recipe, overrides: list[str], flags: dict) -> "object":
    """The recipe's `serve:` section (or defaults for a bare model directory), then CLI flags on top."""
    from pydantic import ValidationError

    from fastserve_cli.core.recipe import ServeConfig, apply_override, format_validation_error, validate_recipe

    if recipe is None:
        raw: dict = {}
        for override in overrides:
            apply_override(raw, override)
        recipe = validate_recipe(raw, "--set")
    data = {**recipe.serve.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, "serve")) from None
