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

from fastserve_cli.core.batches import IGNORE_INDEX
from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import DataConfig, Recipe
from fastserve_cli.core.rundir import RunDir, StageResult, staged_dir
from fastserve_cli.core.sources import find_files

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


# ------------------------------------------------------------------ tokenizing and packing


def render_chat(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def pack_blocks(token_batches: Iterator[list[list[int]]], block_size: int, eos_id: int, pad_id: int, stats: dict):
    """Concatenate documents with EOS after each and cut fixed blocks; yields Arrow record batches.

    No token is dropped: the tail block is padded, its pad positions carry attention_mask 0 and label -100.
    Work is done on numpy arrays per tokenizer batch, so the cost per token stays in C.
    """
    import numpy as np

    carry = np.empty(0, dtype=np.int32)
    for batch in token_batches:
        total = sum(len(ids) for ids in batch) + len(batch)
        flat = np.empty(len(carry) + total, dtype=np.int32)
        flat[: len(carry)] = carry
        pos = len(carry)
        for ids in batch:
            flat[pos : pos + len(ids)] = ids
            pos += len(ids)
            flat[pos] = eos_id
            pos += 1
        stats["documents"] += len(batch)
        stats["tokens"] += total - len(batch)
        full = len(flat) // block_size * block_size
        if full:
            blocks = flat[:full]
            yield _record_batch(blocks, np.ones(full, dtype=np.int8), blocks, block_size)
        carry = flat[full:]
    if len(carry):
        pad = block_size - len(carry)
        ids = np.concatenate([carry, np.full(pad, pad_id, dtype=np.int32)])
        mask = np.concatenate([np.ones(len(carry), dtype=np.int8), np.zeros(pad, dtype=np.int8)])
        labels = np.concatenate([carry, np.full(pad, IGNORE_INDEX, dtype=np.int32)])
        yield _record_batch(ids, mask, labels, block_size)


def _list_column(values, block_size: int):
    import numpy as np
    import pyarrow as pa

    offsets = np.arange(0, len(values) + 1, block_size, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _record_batch(ids, mask, labels, block_size: int):
    import pyarrow as pa

    return pa.RecordBatch.from_arrays(
        [_list_column(ids, block_size), _list_column(mask, block_size), _list_column(labels, block_size)],
        names=["input_ids", "attention_mask", "labels"],
    )


def text_token_batches(
    docs, column: str, tokenizer, cfg: DataConfig, is_chat: bool, progress
) -> Iterator[list[list[int]]]:
    """Token ids per document, batch by batch, with the Rust tokenizer (already multi-threaded).

    A worker thread encodes the next batch while the caller packs this one (encode_batch releases the
    GIL), so packing and Arrow writes hide in the tokenizer's idle tail instead of adding to it.
    """
    if cfg.num_proc > 1:
        yield from _token_batches_multiprocess(docs, column, tokenizer, cfg, is_chat, progress)
        return
    from concurrent.futures import ThreadPoolExecutor

    backend = tokenizer.backend_tokenizer

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    def texts_of(batch: dict) -> list[str]:
        return [render_chat(tokenizer, m) for m in batch[column]] if is_chat else batch[column]

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in docs.iter(batch_size=cfg.batch_size):
            texts = texts_of(batch)
            future = pool.submit(encode, texts)
            if pending is not None:
                yield pending[0].result()
                progress(pending[1])
            pending = (future, len(texts))
        if pending is not None:
            yield pending[0].result()
            progress(pending[1])


def _token_batches_multiprocess(docs, column, tokenizer, cfg, is_chat, progress):
    """datasets.map over N processes; never reuses a cached result, so timings are honest."""

    def encode(batch: dict) -> dict:
        texts = [render_chat(tokenizer, m) for m in batch[column]] if is_chat else batch[column]
        return {"ids": [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]}

    tokenized = docs.map(
        encode,
        batched=True,
        batch_size=cfg.batch_size,
        num_proc=cfg.num_proc,
        remove_columns=[column],
        load_from_cache_file=False,
        keep_in_memory=True,
    )
    for batch in tokenized.iter(batch_size=cfg.batch_size):
        progress(len(batch["ids"]))
        yield batch["ids"]


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of assistant turns (trained on in SFT).

    Works with any template that renders prefixes consistently: each assistant turn is what
    rendering messages[:i+1] adds beyond rendering messages[:i] with a generation prompt.
    """
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if after.startswith(before):
            spans.append((len(before), len(after)))
    return render_chat(tokenizer, messages), spans


def sft_examples(docs, column: str, tokenizer, cfg: DataConfig, stats: dict, progress):
    """One sequence per conversation (truncated to block_size), labels only on assistant tokens."""
    import pyarrow as pa

    for batch in docs.iter(batch_size=cfg.batch_size):
        rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for messages in batch[column]:
            text, spans = assistant_spans(tokenizer, messages)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"][: cfg.block_size]
            offsets = enc["offset_mapping"][: cfg.block_size]
            labels = [
                tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX for tok, (start, _) in zip(ids, offsets)
            ]
            stats["documents"] += 1
            stats["tokens"] += len(ids)
            if any(label != IGNORE_INDEX for label in labels):
                rows["input_ids"].append(ids)
                rows["attention_mask"].append([1] * len(ids))
                rows["labels"].append(labels)
            else:
                stats["examples_without_assistant_tokens"] += 1
        progress(len(batch[column]))
        if rows["input_ids"]:
            yield pa.RecordBatch.from_pydict(rows, schema=ARROW_SCHEMA())


def ARROW_SCHEMA():
    import pyarrow as pa

    return pa.schema(
        [("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())), ("labels", pa.list_(pa.int32()))]
    )


def write_arrow(batches, path: Path):
    """Stream record batches into an Arrow file and memory-map it as a `datasets.Dataset`."""
    import datasets
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ARROW_SCHEMA()) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return datasets.Dataset.from_file(str(path))


def build_split(docs, column: str, tokenizer, cfg: DataConfig, is_chat: bool, out: Path, progress) -> tuple[Any, dict]:
    stats = {"documents": 0, "tokens": 0, "examples_without_assistant_tokens": 0}
    if cfg.mode == "sft":
        batches = sft_examples(docs, column, tokenizer, cfg, stats, progress)
    else:
        token_batches = text_token_batches(docs, column, tokenizer, cfg, is_chat, progress)
        batches = pack_blocks(token_batches, cfg.block_size, tokenizer.eos_token_id, tokenizer.pad_token_id, stats)
    return write_arrow(batches, out), stats


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
