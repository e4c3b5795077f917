"""Recipe sections for building a model: data (and its cleaning), tokenizer, model, train."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fastserve_cli.core.tracking import TRACKERS


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
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="bf16: autocast (weights and optimizer state stay fp32) on GPUs and on CPUs with "
        "avx512_bf16/AMX (an error on other CPUs); fp16: GPUs only. See docs/train.md.",
    )
    torch_compile: bool = False
    fused_kernels: bool = Field(
        True,
        description="Fused tanh-GELU and a chunked linear+cross-entropy loss (same math, fewer memory passes; see fastserve_cli/models/kernels.py).",
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
