"""The commands that load a model to answer requests: serve (HTTP, one process or Ray replicas) and batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from fastserve_cli.cli.common import (
    JsonOption,
    SetOption,
    app,
    load_target,
    pick_target,
    stdout_json,
)


def serving_target(target: str | None, overrides: list[str] | None, flags: dict[str, Any]):
    """What `serve` and `batch` load: (ServeTarget, ServeConfig) from a run directory, a recipe or a model
    directory, with the recipe's serve section, --set overrides and flags on top."""
    from fastserve_cli.serve import resolve_target, serve_config

    path = Path(pick_target(target))
    is_model_dir = path.is_dir() and not (path / "recipe.yaml").is_file()
    recipe = None if is_model_dir else load_target(str(path), overrides)
    cfg = serve_config(recipe, (overrides or []) if is_model_dir else [], flags)
    if recipe is not None:
        return resolve_target(path, cfg.backend, cfg.source, recipe), cfg
    # a bare model directory picks its backend from its files unless --backend or --set serve.backend says
    backend = flags.get("backend") or (
        cfg.backend if any(o.startswith("serve.backend=") for o in overrides or []) else None
    )
    return resolve_target(path, backend, cfg.source, None), cfg


@app.command()
def serve(
    target: Optional[str] = typer.Argument(
        None,
        help="A run directory, a recipe, or a model/ONNX directory; default: as for the stage commands.",
        show_default=False,
    ),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (serve.host, default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="TCP port (serve.port, default 8000)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch or onnx."),
    source: Optional[str] = typer.Option(
        None, "--source", help="With a run directory: model, onnx or an optimize variant."
    ),
    scheduler: Optional[str] = typer.Option(
        None,
        "--scheduler",
        help="skip-join-mlfq (default: FastServe, short requests first), fcfs, or srpt-oracle (a benchmark bound that reads max_tokens).",
    ),
    starvation_s: Optional[float] = typer.Option(
        None, "--starvation-s", help="skip-join-mlfq: promote requests waiting longer than this to the top queue."
    ),
    base_quantum_s: Optional[float] = typer.Option(
        None, "--base-quantum-s", help="skip-join-mlfq: first queue's quantum; measured at start-up when unset."
    ),
    mlfq_levels: Optional[int] = typer.Option(
        None, "--mlfq-levels", help="skip-join-mlfq: number of queues (8); the last one is first come, first served."
    ),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Requests per iteration."),
    max_num_batched_tokens: Optional[int] = typer.Option(
        None, "--max-num-batched-tokens", help="Token budget per iteration."
    ),
    prefill_chunk_tokens: Optional[str] = typer.Option(
        None,
        "--prefill-chunk-tokens",
        help="Chunked prefill while others decode: most prompt tokens per iteration, auto, or 0 (off, the default).",
    ),
    kv_cache_memory: Optional[str] = typer.Option(None, "--kv-cache-memory", help="KV-cache budget, e.g. 512MiB."),
    prefix_cache: Optional[bool] = typer.Option(
        None,
        "--prefix-cache/--no-prefix-cache",
        help="Reuse the KV of shared prompt prefixes (serve.prefix_cache, on).",
    ),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="FASTSERVE_API_KEY", help="Require this bearer key."
    ),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Waiting requests before 429."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Name clients send as `model`."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads; all cores when unset."),
    log_requests: Optional[str] = typer.Option(
        None, "--log-requests", help="Append each chat exchange to this JSONL (off by default; see docs/feedback.md)."
    ),
    replicas: Optional[int] = typer.Option(
        None, "--replicas", help="Engine replicas on Ray Serve (extra fastserve[ray]); 1 = this process."
    ),
    router: Optional[str] = typer.Option(
        None, "--router", help="With --replicas: least-loaded (default), round-robin or prefix."
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="`auto` joins a `ray start` cluster; unset starts a local one."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="torch backend: fp32 (default) or bf16 (CPUs with avx512_bf16/AMX, GPUs)."
    ),
    set_: Optional[list[str]] = SetOption,
) -> None:
    """OpenAI-compatible HTTP server with continuous batching (stops gracefully on SIGTERM)."""
    from fastserve_cli.serve import serve as run_server

    flags = dict(
        host=host,
        port=port,
        backend=backend,
        source=source,
        scheduler=scheduler,
        max_batch_size=max_batch_size,
        max_num_batched_tokens=max_num_batched_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens,
        kv_cache_memory=kv_cache_memory,
        prefix_cache=prefix_cache,
        api_key=api_key,
        max_queue=max_queue,
        model_name=model_name,
        num_threads=threads,
        starvation_s=starvation_s,
        base_quantum_s=base_quantum_s,
        mlfq_levels=mlfq_levels,
        log_requests=log_requests,
        replicas=replicas,
        router=router,
        ray_address=ray_address,
        dtype=dtype,
    )
    resolved, cfg = serving_target(target, set_, flags)
    try:
        run_server(resolved, cfg)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGTERM/SIGINT it handled after a graceful shutdown
        return


@app.command()
def batch(
    target: str = typer.Argument(..., help="A run directory, a recipe, or a model/ONNX directory (as for serve)."),
    input_path: str = typer.Argument(..., metavar="REQUESTS", help="OpenAI Batch API input (.jsonl)."),
    output: str = typer.Option(..., "--output", "-o", help="Results (.jsonl); an existing one is resumed."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch or onnx."),
    source: Optional[str] = typer.Option(
        None, "--source", help="With a run directory: model, onnx or an optimize variant."
    ),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="fcfs (default here: best throughput) or skip-join-mlfq."
    ),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Requests per iteration."),
    kv_cache_memory: Optional[str] = typer.Option(None, "--kv-cache-memory", help="KV-cache budget, e.g. 512MiB."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The `model` the request bodies must name."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads; all cores when unset."),
    max_in_flight: int = typer.Option(
        1024, "--max-in-flight", min=1, help="Engine requests queued at once (bounds memory)."
    ),
    set_: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Answer an OpenAI Batch API file with the serving engine, in-process (resumable)."""
    from fastserve_cli.batch import run_batch

    flags = dict(
        backend=backend,
        source=source,
        scheduler=scheduler or "fcfs",
        max_batch_size=max_batch_size,
        kv_cache_memory=kv_cache_memory,
        model_name=model_name,
        num_threads=threads,
    )
    resolved, cfg = serving_target(target, set_, flags)
    result = run_batch(resolved, cfg, Path(input_path), Path(output), max_in_flight, show_progress=not as_json)
    if as_json:
        stdout_json({"command": "batch", "output": output, "metrics": result.metrics()})
        return
    from fastserve_cli.core.console import metrics_table

    metrics_table(f"batch done: {output}", result.metrics())
