"""Run directories whose earlier stages are done, built by hand: a stage under test starts from real artifacts
(a tiny saved model, Arrow blocks of stdlib text) without running the stages before it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from fastserve_cli.testing.corpus import stdlib_texts
from fastserve_cli.testing.models import make_tiny_model


def pack_blocks(tokenizer, texts: Iterable[str], block_size: int, limit: int | None = None) -> list[list[int]]:
    """Texts tokenized, each followed by EOS, concatenated and cut into full blocks (at most `limit`)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if limit is not None and len(ids) > (limit + 1) * block_size:
            break
    count = len(ids) // block_size if limit is None else min(limit, len(ids) // block_size)
    return [ids[i * block_size : (i + 1) * block_size] for i in range(count)]


def save_blocks(train: list[list[int]], validation: list[list[int]], out: Path) -> None:
    """A DatasetDict (train/validation) in the preprocess stage's layout: input_ids, attention_mask, labels."""
    from datasets import Dataset, DatasetDict

    def rows(blocks: list[list[int]]) -> dict[str, list]:
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks}

    DatasetDict(
        {"train": Dataset.from_dict(rows(train)), "validation": Dataset.from_dict(rows(validation))}
    ).save_to_disk(str(out))


def write_blocks(tokenizer_dir: Path, out: Path, block_size: int = 64, validation: int = 12) -> None:
    """The sample stdlib modules packed into blocks; the last `validation` blocks are the validation split."""
    from transformers import AutoTokenizer

    blocks = pack_blocks(AutoTokenizer.from_pretrained(tokenizer_dir), stdlib_texts(), block_size)
    save_blocks(blocks[:-validation], blocks[-validation:], out)


def make_trained_run(
    root: Path,
    architecture: str,
    tokenizer_dir: Path,
    variants: list[dict[str, Any]],
    gates: dict[str, Any] | None = None,
    train_done: bool = True,
) -> Path:
    """A run dir whose preprocess and train stages are done, and a recipe pointing at it; returns the recipe."""
    from fastserve_cli.core.rundir import RunDir

    run = RunDir(root / "run")
    make_tiny_model(architecture, tokenizer_dir, run.model_dir)
    write_blocks(tokenizer_dir, run.data_dir)
    run.update_stage("preprocess", status="done", run_id="pre-1")
    if train_done:
        run.update_stage("train", status="done", run_id="train-1")
    recipe = {
        "name": f"opt-{architecture}",
        "run_dir": str(run.root),
        "train": {"per_device_train_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0},
        "optimize": {
            "eval_blocks": 4,
            "latency_prompt_tokens": 8,
            "latency_new_tokens": 4,
            "latency_repeats": 1,
            "variants": variants,
        },
        "gates": gates or {},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path
