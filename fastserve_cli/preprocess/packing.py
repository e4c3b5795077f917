"""Tokenizing and packing: documents -> fixed-length blocks with EOS between documents (pack mode) or one
example per chat with assistant-only labels (sft mode), streamed into Arrow files with bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from fastserve_cli.core.batches import IGNORE_INDEX
from fastserve_cli.core.recipe import DataConfig


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
