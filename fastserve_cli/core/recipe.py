"""Typed recipes: one pydantic model per section, unknown keys rejected with a suggestion.

A recipe is YAML; relative paths resolve against the recipe file, `{stdlib}` expands to the running
Python's standard library directory, and `--set a.b=c` overrides are applied before validation so
they are typed and checked exactly like keys in the file.
"""

from __future__ import annotations

import difflib
import sysconfig
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.tracking import TRACKERS

PATH_VARIABLES = {"stdlib": lambda: sysconfig.get_paths()["stdlib"]}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NearDedupConfig(Section):
    """MinHash LSH over word n-gram shingles (datasketch's MinHash, banding done on disk)."""

    threshold: float = Field(
        0.7,
        gt=0.0,
        lt=1.0,
        description="Estimated Jaccard similarity (of word-trigram sets) at or above which a later document is a near-duplicate of an earlier one; 0.7 with 3-grams found 98% of planted near-copies (0.5-2% of words changed) at precision 1.0 (scripts/bench_preprocess.py).",
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: sharper threshold, slower).")
    ngram: int = Field(3, ge=1, le=32, description="Words per shingle.")
    seed: int = Field(1, description="MinHash seed; fixed, so the same corpus gives the same result.")


class CleanConfig(Section):
    """Document cleaning before tokenizing; every step is optional. Runs in this order: html, fix_text,
    normalize, pii, length/repetition/symbol/language filters, exact dedup, near dedup."""

    html: Literal["auto", "always", "off"] = Field(
        "auto",
        description="HTML to text with resiliparse (main content: scripts, navigation and boilerplate gone). auto: documents that start like HTML (<!doctype/<html>, e.g. .html files); always: every document (an HTML column).",
    )
    fix_text: bool = Field(True, description="Repair mojibake and broken Unicode with ftfy.")
    normalize: Literal["NFC", "NFKC", "off"] = Field(
        "NFC",
        description="Unicode normal form; also removes control and zero-width characters and normalises whitespace (unless off).",
    )
    pii: bool = Field(False, description="Replace e-mail addresses with <EMAIL> and IP addresses with <IP>.")
    min_chars: int | None = Field(20, ge=1, description="Drop documents shorter than this (after the steps above).")
    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this.")
    repetition: bool = Field(
        True, description="Gopher repetition filters: duplicated lines/paragraphs and repeated n-grams."
    )
    max_symbol_ratio: float | None = Field(
        0.1, gt=0, description="Gopher: drop documents with more '#' and '...' per word than this."
    )
    languages: list[str] = Field(
        default_factory=list, description="Keep only these ISO 639-1 languages (py3langid); empty: no language filter."
    )
    min_language_score: float = Field(
        0.5, ge=0, le=1, description="Language filter: minimum probability of the detected language."
    )
    exact_dedup: bool = Field(
        True, description="Drop documents whose normalised text repeats an earlier one (64-bit hash)."
    )
    near_dedup: NearDedupConfig | None = Field(
        default_factory=NearDedupConfig, description="MinHash LSH near-duplicate removal (null: off)."
    )
    examples: int = Field(3, ge=0, le=100, description="Examples per step written to data/clean_examples.jsonl.")


class DataConfig(Section):
    """Where the raw text comes from and how it becomes training blocks."""

    paths: list[str] = Field(
        default_factory=list, description="Files, directories or globs; `{stdlib}` expands to the stdlib dir."
    )
    dataset: str | None = Field(
        None, description="A hub dataset name passed to `datasets.load_dataset` (needs network)."
    )
    dataset_config: str | None = None
    dataset_split: str = "train"
    exclude: list[str] = Field(default_factory=list, description="Glob patterns (fnmatch on the full path) to drop.")
    format: Literal["auto", "text", "json", "csv", "parquet"] = "auto"
    text_column: str = "text"
    messages_column: str | None = Field(
        None, description="Column of chat `messages` lists, rendered with the chat template."
    )
    mode: Literal["pack", "sft"] = Field(
        "pack",
        description="pack: fixed blocks with EOS between documents; sft: one sequence per example with a loss mask.",
    )
    block_size: int = Field(256, ge=8, le=131072)
    validation_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    max_documents: int | None = Field(None, ge=1)
    on_decode_error: Literal["error", "skip"] = Field(
        "error", description="What to do with a text file that is not valid UTF-8."
    )
    num_proc: int = Field(
        1, ge=1, description="Processes for tokenizing; 1 is fastest on 2 cores (tokenizers already uses both)."
    )
    batch_size: int = Field(
        256,
        ge=1,
        description="Documents per tokenizer batch (encoded by a worker thread while the previous one is packed).",
    )
    clean: CleanConfig | None = Field(
        None, description="Cleaning steps (HTML, Unicode, filters, dedup, PII); off when unset. See docs/cleaning.md."
    )
    min_feedback: float | None = Field(
        None,
        description="Read data.paths as serve request logs (serve.log_requests) and keep exchanges whose latest feedback rating is >= this; a corrected answer replaces the reply. Needs data.messages_column: messages.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.paths and self.dataset:
            raise ValueError("set either data.paths or data.dataset, not both")
        if self.mode == "sft" and not self.messages_column:
            raise ValueError("data.mode=sft needs data.messages_column (the column of chat messages)")
        if self.clean is not None and self.messages_column:
            raise ValueError("data.clean works on text documents; it does not apply to data.messages_column")
        if self.min_feedback is not None and (self.messages_column != "messages" or self.dataset):
            raise ValueError("data.min_feedback reads request logs from data.paths: set data.messages_column: messages")
        return self


class TokenizerConfig(Section):
    """Train a byte-level BPE, or load a tokenizer from a local directory."""

    path: str | None = Field(
        None, description="Local directory with a transformers tokenizer; when set, nothing is trained."
    )
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    extra_special_tokens: list[str] = Field(default_factory=lambda: ["<|im_start|>", "<|im_end|>"])
    chat_template: str | None = Field(None, description="Jinja chat template; a ChatML template when unset.")
    max_training_documents: int | None = Field(None, ge=1, description="Train the BPE on at most this many documents.")


class ModelConfig(Section):
    """Model architecture (random init) or a local pretrained directory."""

    architecture: Literal["gpt2", "llama"] = "gpt2"
    size: Literal["tiny", "mini", "small", "base", "medium"] = Field(
        "tiny",
        description="layers/width/heads: tiny 2/128/4, mini 4/256/4, small 6/384/6, base 12/768/12 (GPT-2 124M), medium 24/1024/16.",
    )
    pretrained: str | None = Field(
        None, description="Local directory loadable by AutoModelForCausalLM; overrides architecture/size."
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the transformers config (e.g. n_layer: 4)."
    )
    trust_remote_code: bool = False


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="Module names; per-architecture defaults when unset.")


class DeepSpeedConfig(Section):
    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False


class TrainConfig(Section):
    """Training loop; names follow HF TrainingArguments."""

    max_steps: int = Field(200, ge=1)
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    torch_compile: bool = False
    fused_kernels: bool = Field(
        True,
        description="Fused tanh-GELU and a chunked linear+cross-entropy loss (same math, fewer memory passes; see fastserve_cli/kernels.py).",
    )
    logging_steps: int = Field(10, ge=1)
    eval_steps: int = Field(50, ge=1)
    eval_max_batches: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads; all cores when unset.")
    num_processes: int = Field(
        1,
        ge=1,
        description="Data-parallel processes launched with torchrun (gloo DDP on CPU, NCCL on GPUs); `--num-processes` sets it.",
    )
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["import", "def", "class"],
        description="Greedy samples written to samples.txt after training (empty: none). End prompts where a token ends: with BPE a trailing space is a token the model rarely saw before a word.",
    )
    sample_new_tokens: int = Field(64, ge=1, le=4096)
    report_to: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Experiment trackers (accelerate's: tensorboard, mlflow, wandb, trackio, ...): train logs the numbers of "
        "metrics.jsonl, optimize its report, export its parity. Local stores live under <run>/tracking/; "
        "`pip install 'fastserve[tracking]'` brings tensorboard and mlflow.",
    )
    lora: LoraConfig | None = None
    deepspeed: DeepSpeedConfig | None = None


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
    """Variants of the trained model and how the report measures them (see fastserve_cli/report.py)."""

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
    max_queue: int = Field(256, ge=1)
    kv_cache_memory: str = Field("1GiB", description="KV-cache budget, e.g. 512MiB or 2GB.")
    kv_offload_memory: str = Field("4GiB", description="Host pool for KV caches offloaded from the device budget.")
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
    autoscaling: AutoscalingConfig | None = None


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


class Recipe(Section):
    name: str = "run"
    run_dir: str | None = Field(
        None,
        description="Run directory (relative to the recipe file); ./runs/<name> under the current directory when unset.",
    )
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)

    def section_dump(self, *names: str) -> dict[str, Any]:
        """JSON-able dump of some top-level keys, used for stage fingerprints."""
        return {
            n: (
                getattr(self, n).model_dump(mode="json")
                if isinstance(getattr(self, n), BaseModel)
                else getattr(self, n)
            )
            for n in names
        }


# ---------------------------------------------------------------- loading


def expand_variables(text: str) -> str:
    for name, value in PATH_VARIABLES.items():
        text = text.replace("{" + name + "}", value())
    return text


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(expand_variables(value)).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make every path absolute relative to the recipe's directory."""
    recipe.data.paths = [_resolve(base, p) for p in recipe.data.paths]  # type: ignore[misc]
    recipe.tokenizer.path = _resolve(base, recipe.tokenizer.path)
    recipe.model.pretrained = _resolve(base, recipe.model.pretrained)
    recipe.eval.tasks = [
        _resolve(base, t) if t.endswith((".yaml", ".yml")) or "/" in t else t for t in recipe.eval.tasks
    ]
    recipe.run_dir = _resolve(base, recipe.run_dir) if recipe.run_dir else str(Path("runs", recipe.name).resolve())
    return recipe


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the model reached by following `loc` from Recipe (for did-you-mean)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            break
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            args = getattr(candidate, "__args__", ())
            for c in (candidate, *args):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    model = c
                    break
            else:
                continue
            break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: `section.key: what is wrong, how to fix it`."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc) or "(recipe)"
        if item["type"] == "extra_forbidden":
            valid = _field_names(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
            lines.append(f"{path}: unknown key, {hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"{path}: {message}{shown}")
    first = lines[0]
    more = f" (and {len(lines) - 1} more problem{'s' if len(lines) > 2 else ''})" if len(lines) > 1 else ""
    return f"{origin}: {first}{more}"


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b=c` override to the raw recipe mapping; the value is parsed as YAML."""
    if "=" not in override:
        raise UserError(f"--set {override!r}: expected KEY=VALUE, e.g. --set train.learning_rate=3e-4")
    key, _, value = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {override!r}: empty key, e.g. --set train.max_steps=100")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def validate_recipe(raw: dict[str, Any], origin: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, origin)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found; pass the path of a recipe YAML (see recipes/quickstart.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: recipe is not valid UTF-8 text") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a recipe must be a mapping of sections (data:, train:, ...), got {type(raw).__name__}"
        )
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate and resolve a recipe file."""
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    for override in overrides:
        apply_override(raw, override)
    origin = f"{path.name}" + (" with --set" if overrides else "")
    recipe = validate_recipe(raw, origin)
    return resolve_paths(recipe, path.resolve().parent)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
