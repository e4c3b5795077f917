"""preprocess: raw text/jsonl/csv/parquet -> a tokenizer and a tokenized, packed `DatasetDict`.

Documents are read through `datasets` (Arrow on disk, memory-mapped), split train/validation at the
document level by seed, tokenized in batches with the fast tokenizer, and written as
fixed-length blocks by a generator, so memory stays bounded however large the corpus is.
"""

from __future__ import annotations

import codecs
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import DataConfig, Recipe
from fastserve_cli.core.rundir import RunDir, StageResult, staged_dir
from fastserve_cli.core.sources import find_files
from fastserve_cli.preprocess.packing import build_split, pack_blocks, render_chat  # noqa: F401 (pack_blocks: tests)

FORMAT_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def detect_format(cfg: DataConfig, files: list[str]) -> str:
    if cfg.format != "auto":
        return cfg.format
    formats = {FORMAT_BY_SUFFIX.get(Path(f).suffix.lower(), "text") for f in files}
    if len(formats) > 1:
        raise UserError(
            f"data.paths: mixes {' and '.join(sorted(formats))} files; use one format per recipe or set data.format"
        )
    return formats.pop()


def first_invalid_utf8(path: str) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence, or None; reads in chunks (bounded memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return offset + err.start
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset
    return None


def check_utf8(cfg: DataConfig, files: list[str]) -> tuple[list[str], list[str]]:
    """Split text files into (valid, skipped); raise on the first bad one unless on_decode_error=skip."""
    valid, skipped = [], []
    for path in files:
        bad = first_invalid_utf8(path)
        if bad is None:
            valid.append(path)
        elif cfg.on_decode_error == "skip":
            skipped.append(path)
        else:
            raise UserError(
                f"{path}: not valid UTF-8 (byte {bad}); re-encode it, add it to data.exclude, or set data.on_decode_error=skip"
            )
    if not valid:
        raise UserError("data.paths: no input file is valid UTF-8 text")
    return valid, skipped


# ------------------------------------------------------------------ loading documents


def load_documents(cfg: DataConfig, cache_dir: str) -> tuple[Any, dict[str, Any]]:
    """A `datasets.Dataset` with a `text` (or messages) column, and facts about where it came from.

    Text files are copied into Arrow under `cache_dir`; the caller owns it and deletes it once the
    dataset is no longer needed.
    """
    import datasets

    datasets.disable_progress_bars()
    info: dict[str, Any] = {}
    if cfg.dataset:
        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split)
        except Exception as err:  # offline, unknown name, bad split: all user-fixable
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise UserError(
                f"data.dataset {cfg.dataset}: could not load it ({reason}); offline machines need local data.paths"
            ) from None
        info["source"] = cfg.dataset
    elif cfg.min_feedback is not None:  # serve request logs -> well-rated conversations (core/feedback_log.py)
        from fastserve_cli.preprocess.feedback import load_rated

        ds, info = load_rated(cfg, find_files(cfg), cache_dir)
    else:
        files = find_files(cfg)
        fmt = detect_format(cfg, files)
        if fmt == "text":
            files, skipped = check_utf8(cfg, files)
            info["files_skipped_not_utf8"] = len(skipped)
        info.update(files=len(files), format=fmt)
        ds = _load_files(fmt, files, cache_dir)
    column = cfg.messages_column or cfg.text_column
    if column not in ds.column_names:
        where = cfg.dataset or "the input files"
        key = "data.messages_column" if cfg.messages_column else "data.text_column"
        raise UserError(
            f"{key} {column!r}: no such column in {where} (columns: {', '.join(ds.column_names)}); set {key}"
        )
    ds = ds.select_columns([column])
    if cfg.max_documents is not None and len(ds) > cfg.max_documents:
        ds = ds.select(range(cfg.max_documents))
    return ds, info


def _read_text_files(files: list[str]) -> Iterator[dict[str, str]]:
    for path in files:
        with open(path, encoding="utf-8") as handle:
            yield {"text": handle.read()}


def _load_files(fmt: str, files: list[str], cache_dir: str):
    """Documents as a memory-mapped Arrow dataset, written in batches (bounded memory).

    Text files (one document each) go through `Dataset.from_generator` into a private temp cache:
    `load_dataset("text", sample_by="document")` gives the same rows but resolves every file as a
    pattern, which costs more than reading them. Structured formats use their `load_dataset` builder.
    """
    import uuid

    import datasets

    try:
        if fmt == "text":
            features = datasets.Features({"text": datasets.Value("string")})
            return datasets.Dataset.from_generator(
                _read_text_files,
                gen_kwargs={"files": files},
                features=features,
                cache_dir=cache_dir,
                fingerprint=uuid.uuid4().hex,
            )
        return datasets.load_dataset(fmt, data_files=files, split="train")
    except Exception as err:
        cause = err.__cause__ or err
        reason = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
        raise UserError(
            f"data.paths: could not read the {fmt} files ({reason}); check that they are valid {fmt}"
        ) from None


def drop_empty(ds, column: str, is_chat: bool):
    """Drop empty documents; the result is an in-memory index over the same Arrow data (no cache write)."""
    if is_chat:
        return ds.filter(lambda batch: [bool(m) for m in batch[column]], batched=True, keep_in_memory=True)
    return ds.filter(lambda batch: [bool(t and t.strip()) for t in batch[column]], batched=True, keep_in_memory=True)


def split_documents(ds, fraction: float, seed: int):
    """Deterministic document-level split (no block straddles train and validation)."""
    if len(ds) < 2:
        raise UserError(f"data: only {len(ds)} non-empty document(s); need at least 2 for a train/validation split")
    n_val = min(len(ds) - 1, max(1, round(len(ds) * fraction)))
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(ds))
    return ds.select(order[n_val:], keep_in_memory=True), ds.select(order[:n_val], keep_in_memory=True)


# ------------------------------------------------------------------ tokenizer


def build_tokenizer(recipe: Recipe, train_docs, column: str, is_chat: bool):
    cfg = recipe.tokenizer
    from fastserve_cli.core.tokenizer import load_tokenizer, train_bpe

    if cfg.path:
        return load_tokenizer(cfg.path, cfg.chat_template, recipe.model.trust_remote_code)
    limit = cfg.max_training_documents or len(train_docs)

    def texts() -> Iterator[str]:
        for batch in train_docs.select(range(min(limit, len(train_docs)))).iter(batch_size=1000):
            for item in batch[column]:
                yield "\n".join(m.get("content", "") for m in item) if is_chat else item

    return train_bpe(
        texts(),
        cfg.vocab_size,
        cfg.min_frequency,
        cfg.eos_token,
        cfg.pad_token,
        cfg.extra_special_tokens,
        cfg.chat_template,
    )


# ------------------------------------------------------------------ stage


def run_preprocess(recipe: Recipe, run: RunDir) -> StageResult:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastserve-docs-") as doc_cache:
        return _preprocess(recipe, run, recipe.data, started, doc_cache)


def _preprocess(recipe: Recipe, run: RunDir, cfg: DataConfig, started: float, doc_cache: str) -> StageResult:
    import datasets
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fastserve_cli.core.console import err_console
    from fastserve_cli.models.eos import check_chat_terminator, describe, reply_end_ids

    docs, info = load_documents(cfg, doc_cache)
    column = cfg.messages_column or cfg.text_column
    examples = None
    if cfg.clean is not None:  # data.clean: see preprocess/clean.py; its counts go to the manifest
        from fastserve_cli.preprocess.clean import clean_documents, write_examples

        docs, clean_metrics, examples = clean_documents(docs, cfg.clean, column, doc_cache)
        info.update(clean_metrics)
    is_chat = cfg.messages_column is not None
    docs = drop_empty(docs, column, is_chat)
    train_docs, val_docs = split_documents(docs, cfg.validation_fraction, recipe.seed)
    tokenizer = build_tokenizer(recipe, train_docs, column, is_chat)
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise UserError("tokenizer: needs an eos_token and a pad_token")
    if is_chat:
        check_chat_terminator(tokenizer, trained=recipe.tokenizer.path is None)
    tokenize_start = time.perf_counter()
    progress = Progress(
        TextColumn("preprocess"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("documents"),
        TimeElapsedColumn(),
        console=err_console(),
        transient=True,
    )
    with progress, staged_dir(run.data_dir) as data_tmp, staged_dir(run.tokenizer_dir) as tok_tmp:
        task = progress.add_task("tokenize", total=len(docs))
        advance = lambda n: progress.advance(task, n)  # noqa: E731
        cache = data_tmp / ".cache"
        train_ds, train_stats = build_split(train_docs, column, tokenizer, cfg, is_chat, cache / "train.arrow", advance)
        val_ds, val_stats = build_split(val_docs, column, tokenizer, cfg, is_chat, cache / "validation.arrow", advance)
        if len(train_ds) == 0 or len(val_ds) == 0:
            raise UserError(
                "data: the corpus produced no training examples (no assistant turns?); check data.messages_column"
            )
        tokenize_s = time.perf_counter() - tokenize_start
        datasets.DatasetDict({"train": train_ds, "validation": val_ds}).save_to_disk(str(data_tmp / "dataset"))
        _move_contents(data_tmp / "dataset", data_tmp)
        shutil.rmtree(cache, ignore_errors=True)
        tokenizer.save_pretrained(tok_tmp)
        if examples is not None:
            write_examples(data_tmp / "clean_examples.jsonl", examples)
    tokens = train_stats["tokens"] + val_stats["tokens"]
    metrics = {
        **info,
        "documents": train_stats["documents"] + val_stats["documents"],
        "tokens": tokens,
        "train_tokens": train_stats["tokens"],
        "validation_tokens": val_stats["tokens"],
        "train_blocks": len(train_ds),
        "validation_blocks": len(val_ds),
        "block_size": cfg.block_size,
        "mode": cfg.mode,
        "vocab_size": len(tokenizer),
        "reply_end_tokens": describe(tokenizer, reply_end_ids(tokenizer)),  # what train writes as eos_token_id
        "tokens_per_s": round(tokens / max(tokenize_s, 1e-9)),
        "total_s": round(time.perf_counter() - started, 2),
    }
    dropped = train_stats["examples_without_assistant_tokens"] + val_stats["examples_without_assistant_tokens"]
    if dropped:
        metrics["examples_without_assistant_tokens"] = dropped
    return StageResult(outputs=[run.rel(run.tokenizer_dir), run.rel(run.data_dir)], metrics=metrics)


def _move_contents(src: Path, dst: Path) -> None:
    for child in src.iterdir():
        os.replace(child, dst / child.name)
    src.rmdir()
