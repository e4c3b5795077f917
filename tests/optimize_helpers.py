"""A finished-train run directory built by hand (tiny model + real Arrow data), for the optimize tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from conftest import make_tiny_model, stdlib_texts


def write_blocks(tokenizer_dir: Path, out: Path, block_size: int = 64, validation: int = 12) -> None:
    """Stdlib text tokenized and packed into blocks, saved as a DatasetDict (train/validation)."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: list[int] = []
    for text in stdlib_texts():
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    rows = lambda bs: {"input_ids": bs, "attention_mask": [[1] * len(b) for b in bs], "labels": bs}  # noqa: E731
    DatasetDict({"train": Dataset.from_dict(rows(blocks[:-validation])),
                 "validation": Dataset.from_dict(rows(blocks[-validation:]))}).save_to_disk(str(out))


def make_trained_run(root: Path, architecture: str, tokenizer_dir: Path, variants: list[dict[str, Any]],
                     gates: dict[str, Any] | None = None, train_done: bool = True) -> Path:
    """A run dir whose preprocess and train stages are done, and a recipe pointing at it; returns the recipe."""
    from fastserve_cli.core.rundir import RunDir

    run = RunDir(root / "run")
    make_tiny_model(architecture, tokenizer_dir, run.model_dir)
    write_blocks(tokenizer_dir, run.data_dir)
    run.update_stage("preprocess", status="done", run_id="pre-1")
    if train_done:
        run.update_stage("train", status="done", run_id="train-1")
    recipe = {
        "name": f"opt-{architecture}", "run_dir": str(run.root),
        "train": {"per_device_train_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0},
        "optimize": {"eval_blocks": 4, "latency_prompt_tokens": 8, "latency_new_tokens": 4, "latency_repeats": 1,
                     "variants": variants},
        "gates": gates or {},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path
