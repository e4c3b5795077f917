"""Recipe sections for what happens to a trained model: optimize, export, serve, eval, gates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fastserve_cli.core.recipe_build import Section


class VariantConfig(Section):
    """One optimized variant of the trained model, written to optimized/<name>/."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Directory name under optimized/; serve/export pick it by this name.",
    )
    method: Literal["magnitude", "structured", "dynamic_int8", "weight_only_int8", "weight_only_int4", "gptq"] = Field(
        ...,
        description="gptq: calibrated int4 (same format as weight_only_int4). ONNX quantization lives in export.quantize; its variants join the same report.",
    )
    sparsity: float | None = Field(None, gt=0, lt=1, description="magnitude: fraction of weights set to zero.")
    scope: Literal["global", "layer"] = Field(
        "global", description="magnitude: rank all block weights together, or each layer alone."
    )
    heads_fraction: float | None = Field(
        None, ge=0, lt=1, description="structured: fraction of attention heads removed from every layer."
    )
    heads_per_layer: int | None = Field(
        None,
        ge=0,
        description="structured: number of attention heads removed from every layer (instead of heads_fraction).",
    )
    neurons_fraction: float | None = Field(
        None, ge=0, lt=1, description="structured: fraction of MLP neurons removed from every layer."
    )
    importance: Literal["weight", "activation", "gradient"] = Field(
        "weight", description="structured: how heads/neurons are ranked."
    )
    calibration_blocks: int = Field(
        16,
        ge=1,
        description="structured: validation blocks for activation/gradient importance; gptq: blocks its Hessians come from.",
    )
    recovery_steps: int = Field(
        0, ge=0, description="Fine-tune steps after pruning (the train stage's optimizer and schedule)."
    )
    group_size: int = Field(
        128, ge=32, description="weight_only_int4 and gptq: input channels per scale group (power of two)."
    )
    source: str | None = Field(
        None,
        description="Start from this earlier (pruning) variant instead of the trained model, e.g. int8 of a pruned model.",
    )

    @model_validator(mode="after")
    def _fields_fit_method(self) -> "VariantConfig":
        where = f"variant {self.name}"
        if self.method == "magnitude" and self.sparsity is None:
            raise ValueError(f"{where}: method magnitude needs sparsity, e.g. sparsity: 0.5")
        if self.method == "structured":
            if self.heads_fraction is not None and self.heads_per_layer is not None:
                raise ValueError(f"{where}: set heads_fraction or heads_per_layer, not both")
            if not (self.heads_fraction or self.heads_per_layer or self.neurons_fraction):
                raise ValueError(
                    f"{where}: method structured needs heads_fraction, heads_per_layer or neurons_fraction"
                )
        if self.method != "magnitude" and self.sparsity is not None:
            raise ValueError(f"{where}: sparsity only applies to method magnitude")
        if self.method != "structured" and (self.heads_fraction or self.heads_per_layer or self.neurons_fraction):
            raise ValueError(
                f"{where}: heads_fraction/heads_per_layer/neurons_fraction only apply to method structured"
            )
        if self.recovery_steps and self.method not in ("magnitude", "structured"):
            raise ValueError(f"{where}: recovery_steps only apply to pruning methods")
        return self


class OptimizeConfig(Section):
    """Variants of the trained model and how the report measures them (see fastserve_cli/models/measure.py)."""

    variants: list[VariantConfig] = Field(default_factory=list)
    eval_blocks: int = Field(32, ge=1, description="Validation blocks used for perplexity (the first N of the split).")
    latency_prompt_tokens: int = Field(32, ge=1, description="Prompt length of the batch-1 decode benchmark.")
    latency_new_tokens: int = Field(64, ge=2, description="Tokens generated per decode benchmark run.")
    latency_repeats: int = Field(3, ge=1, description="Timed decode runs (after a warm-up); the best is reported.")

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[VariantConfig]) -> list[VariantConfig]:
        names = [v.name for v in variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique, repeated: {', '.join(dupes)}")
        for i, variant in enumerate(variants):
            earlier = {v.name: v.method for v in variants[:i]}
            if variant.source is not None and earlier.get(variant.source) not in ("magnitude", "structured"):
                pruned = [n for n, m in earlier.items() if m in ("magnitude", "structured")]
                raise ValueError(
                    f"variant {variant.name}: source {variant.source!r} must name an earlier pruning variant"
                    f" ({', '.join(pruned) or 'none listed before it'})"
                )
        return variants


class ExportConfig(Section):
    """ONNX export of the trained model (or an optimize variant) into onnx/, parity-checked."""

    onnx: bool = True
    source: str = Field("model", description="`model` (the trained model) or the name of an optimize variant.")
    opset: int = Field(17, ge=13, le=23)
    optimize: bool = Field(False, description="Run onnxruntime's transformer graph optimizer (checked for parity too).")
    quantize: list[Literal["dynamic_int8", "static_int8", "int4"]] = Field(default_factory=list)
    fp16: bool = Field(False, description="fp16 export (GPU only).")
    parity_atol: float = Field(1e-3, gt=0, description="Max |Δlogits| allowed between ONNX and PyTorch (fp32 graph).")
    parity_steps: int = Field(32, ge=1, description="Greedy steps whose tokens must be identical.")
    calibration_blocks: int = Field(
        8,
        ge=1,
        description="Validation blocks (the last N) that calibrate static int8; perplexity uses optimize.eval_blocks.",
    )
    int4_block_size: int = Field(32, ge=16, description="MatMulNBits block size (a power of two).")


class AutoscalingConfig(Section):
    """Mapped onto Ray Serve's autoscaling_config (serve.replicas is then the initial count)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests per replica Ray Serve scales towards.")


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    backend: Literal["torch", "onnx"] = "torch"
    source: str = Field("model", description="`model`, an optimize variant name, or `onnx`.")
    model_name: str | None = Field(None, description="Name clients send as `model`; the run name when unset.")
    scheduler: Literal["fcfs", "skip-join-mlfq", "srpt-oracle"] = Field(
        "skip-join-mlfq",
        description="skip-join-mlfq (FastServe, preemptive: short requests first), fcfs, or "
        "srpt-oracle (knows each output length from max_tokens: a benchmark bound, not for production).",
    )
    max_batch_size: int = Field(8, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    prefill_chunk_tokens: int | Literal["auto"] | None = Field(
        0,
        description="Chunked prefill: while other requests decode, a prompt is prefilled at most this many "
        "tokens per iteration (never over max_num_batched_tokens), so a long prompt does not stall the running "
        "streams; with nobody decoding it runs whole. auto: the most tokens whose prefill costs one full-batch "
        "decode iteration, from the start-up profile (running streams' inter-token latency then stays about 2x "
        "steady while a prompt prefills, and the long prompt's own first token comes ~4x later). 0 or null (default): "
        "prompts always prefill whole. See docs/serve.md.",
    )
    max_queue: int = Field(256, ge=1)
    kv_cache_memory: str = Field("1GiB", description="KV-cache budget, e.g. 512MiB or 2GB.")
    kv_offload_memory: str = Field("4GiB", description="Host pool for KV caches offloaded from the device budget.")
    prefix_cache: bool = Field(
        True,
        description="Automatic prefix caching: KV of full token blocks is kept after each prefill and reused by "
        "later requests whose prompts start with the same tokens (a shared system prompt). Lives inside "
        "kv_cache_memory; evicted least recently used before any request is offloaded. See docs/serve.md.",
    )
    prefix_cache_block_size: int = Field(
        16, ge=1, description="Prefix cache: tokens per cached block (only full blocks are cached and matched)."
    )
    prefix_cache_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Prefix cache: the most of kv_cache_memory its blocks may hold (they only use room the "
        "running requests leave free).",
    )
    shutdown_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish.")
    num_threads: int | None = Field(
        None, ge=1, description="Intra-op threads (torch / onnxruntime); all cores when unset."
    )
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="torch backend: compute precision of weights, activations and KV cache. bf16 needs a "
        "CPU with avx512_bf16/AMX or a GPU with compute capability 8.0+ (an error elsewhere).",
    )
    fast_kernels: bool = Field(
        True,
        description="torch backend on CPU: fp32 Linear layers through oneDNN and GPT-2's GELU fused (same math, faster decode).",
    )
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer <key>`; FASTSERVE_API_KEY also sets it."
    )
    log_requests: str | None = Field(
        None,
        description="Off by default. A JSONL path: each finished chat exchange (messages, reply, usage; never the API key) is appended, and POST /v1/feedback rates it. See docs/feedback.md.",
    )
    starvation_s: float = Field(3.0, gt=0)
    base_quantum_s: float | None = Field(
        None, gt=0, description="Skip-join MLFQ base quantum; measured at start-up when unset."
    )
    mlfq_levels: int | None = Field(
        8,
        ge=2,
        description="Skip-join MLFQ queue count; the last queue serves its requests first come, first served "
        "(from 2**(levels-1) - 1 base quanta of service on). null: levels without end, as in FastServe's code.",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="Engine replicas; above 1 they run on Ray Serve (extra fastserve[ray]) "
        "behind an ingress on host:port. 1 = this single process.",
    )
    router: Literal["least-loaded", "round-robin", "prefix"] = Field(
        "least-loaded",
        description="Replica choice: least-loaded (power of two choices on live load), round-robin, or "
        "prefix (same long prompt prefix -> same replica while it is not overloaded).",
    )
    ray_address: str | None = Field(
        None, description="`auto` joins a running `ray start` cluster; unset starts a local one."
    )
    replica_cpus: float = Field(
        1.0, gt=0, description="CPUs per replica (its intra-op threads unless num_threads is set)."
    )
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    replica_stream_interval: int = Field(
        1,
        ge=1,
        description="Tokens a replica gathers per streamed item to the ingress after the first (as vLLM's "
        "stream_interval): 1 streams every token; 4 cuts Ray's per-item cost 4x, clients get tokens in bursts.",
    )
    ray_transport: Literal["grpc", "object-ref"] = Field(
        "grpc",
        description="How replicas stream tokens to the ingress: grpc (Ray Serve's inter-deployment gRPC, "
        "a third of the per-token cost) or object-ref (one Ray object per streamed item; needs no replica port).",
    )
    autoscaling: AutoscalingConfig | None = None

    @field_validator("prefill_chunk_tokens", mode="before")
    @classmethod
    def _chunk_tokens(cls, value):
        """One clear message for every bad value (a union of int and "auto" would report one per member)."""
        if value is None or value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ValueError("a token count >= 0 (0 turns chunked prefill off) or auto")


class EvalSourceConfig(Section):
    """One artifact to evaluate, and how it is run."""

    source: str = Field(..., description="`model`, an optimize variant name, or `onnx`.")
    via: Literal["process", "server"] = Field(
        "process",
        description="process: lm-eval runs the model in the stage's process (its `hf` model for torch "
        "directories, ours for ONNX); server: `fastserve serve` on a free port and lm-eval's `local-completions`.",
    )


class EvalConfig(Section):
    """lm-evaluation-harness tasks run on the run's artifacts (the eval stage; needs `pip install fastserve[eval]`)."""

    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval task or group names, or paths to task YAML "
        "files/folders (local tasks); our offline tasks: stdlib_code, stdlib_next_line, stdlib_files.",
    )
    sources: list[EvalSourceConfig | str] = Field(
        default_factory=lambda: ["model"],
        validate_default=True,
        description="Artifacts to evaluate: `model`, variant names, `onnx`, or {source: X, via: server}.",
    )
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0, description="Documents per task (a fraction when < 1); all when unset.")
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(None, ge=8, description="Tokens per scored window; the model's context when unset.")

    @field_validator("sources")
    @classmethod
    def _as_configs(cls, sources: list[EvalSourceConfig | str]) -> list[EvalSourceConfig | str]:
        configs = [EvalSourceConfig(source=s) if isinstance(s, str) else s for s in sources]
        labels = [c.source + ("@server" if c.via == "server" else "") for c in configs]
        dupes = sorted({n for n in labels if labels.count(n) > 1})
        if dupes:
            raise ValueError(f"sources are repeated: {', '.join(dupes)}")
        return configs


class GatesConfig(Section):
    """Bounds an optimize variant must meet; a broken gate fails the stage."""

    max_perplexity_increase: float | None = Field(None, ge=0, description="Relative, e.g. 0.03 = +3%.")
    min_speedup: float | None = Field(None, gt=0)
    max_size_ratio: float | None = Field(None, gt=0)
    eval: dict[str, dict[str, float | dict[Literal["min", "max"], float]]] = Field(
        default_factory=dict,
        description="Eval stage: {TASK: {METRIC: min}} (or {METRIC: {max: X}} for metrics "
        "where lower is better, e.g. bits_per_byte); every evaluated source must meet each bound.",
    )
