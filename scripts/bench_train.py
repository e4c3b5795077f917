#!/usr/bin/env python
"""Training throughput: fastserve's loop vs HF `Trainer`, same model, data, steps and threads, one run.

The model is GPT-2-shaped (6 layers, 6 heads, 384 wide; `model.size: small`), sequence 256, batch 8,
fp32, 2 threads, on packed blocks of the stdlib sources made by the real preprocess stage. Both start
from the same random init and train the same steps with AdamW (fused), warmup + cosine and clipping.
Tokens/s is measured over the steps after `--skip` warm-up steps, from per-step wall-clock stamps
(ours: metrics.jsonl; Trainer: a callback), so set-up, evaluation and saving are excluded for both.
MFU = model FLOPs/s (6N + attention, per token) / the fp32 matmul FLOP/s measured here on 2 threads.

    .venv/bin/python scripts/bench_train.py [--steps 30] [--skip 5] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEQ, BATCH, THREADS = 256, 8, 2


def recipe_for(root: Path, steps: int, compile_: bool):
    from fastserve_cli.core.recipe import Recipe, resolve_paths

    return resolve_paths(
        Recipe.model_validate(
            {
                "name": "bench",
                "run_dir": str(root / "run"),
                "seed": 0,
                "data": {"paths": ["{stdlib}/*.py"], "block_size": SEQ, "on_decode_error": "skip"},
                "tokenizer": {"vocab_size": 8192},
                "model": {"architecture": "gpt2", "size": "small"},
                "train": {
                    "max_steps": steps,
                    "per_device_train_batch_size": BATCH,
                    "learning_rate": 1e-3,
                    "warmup_steps": 5,
                    "logging_steps": 1,
                    "eval_steps": 10**6,
                    "save_steps": 10**6,
                    "eval_max_batches": 1,
                    "num_threads": THREADS,
                    "torch_compile": compile_,
                },
            }
        ),
        root,
    )


def throughput(stamps: dict[int, float], skip: int, tokens_per_step: int) -> float:
    last = max(stamps)
    return (last - skip) * tokens_per_step / (stamps[last] - stamps[skip])


def run_ours(recipe, run, skip: int) -> float:
    from fastserve_cli.core.pipeline import execute

    execute("train", recipe, run)
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    stamps = {r["step"]: r["time"] for r in records if "time" in r}
    return throughput(stamps, skip, SEQ * BATCH)


def run_trainer(recipe, run, steps: int, skip: int, out: Path) -> float:
    """HF Trainer on the same dataset, with the same config, init, optimizer and schedule."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from fastserve_cli.models.modeling import build_model

    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    model = build_model(recipe.model, tokenizer, SEQ, recipe.seed)
    train = load_from_disk(str(run.data_dir))["train"]
    stamps: dict[int, float] = {}

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps[state.global_step] = time.time()

    cfg = recipe.train
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=recipe.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    torch.set_num_threads(THREADS)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[Stamp()]).train()
    return throughput(stamps, skip, SEQ * BATCH)


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """fp32 FLOP/s of a large square matmul on `threads` threads: the denominator of MFU."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="Warm-up steps left out of the timing.")
    parser.add_argument("--compile", action="store_true", help="Our loop with train.torch_compile (Trainer without).")
    args = parser.parse_args()

    import torch

    from fastserve_cli.core.pipeline import execute, prepare_run_dir
    from fastserve_cli.models.modeling import flops_per_token

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = recipe_for(root, args.steps, args.compile)
        run = prepare_run_dir(recipe)
        execute("preprocess", recipe, run)
        ours = run_ours(recipe, run, args.skip)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(run.model_dir)
        theirs = run_trainer(recipe, run, args.steps, args.skip, root / "hf")
    peak = matmul_peak(THREADS)
    flops = flops_per_token(config, SEQ)
    print(
        f"model: gpt2 small (6 layers, 6 heads, 384 wide), vocab {config.vocab_size}, seq {SEQ}, batch {BATCH}, "
        f"fp32, {THREADS} threads, {args.steps} steps (first {args.skip} untimed)"
    )
    print(f"fastserve loop : {ours:8.0f} tokens/s   MFU {ours * flops / peak:6.1%}")
    print(f"HF Trainer     : {theirs:8.0f} tokens/s   MFU {theirs * flops / peak:6.1%}")
    print(f"ratio          : {ours / theirs:8.2f}x   (target >= 1.1)")
    print(f"matmul peak    : {peak / 1e9:8.1f} GFLOP/s fp32 on {THREADS} threads; {flops / 1e6:.1f} MFLOP per token")


if __name__ == "__main__":
    main()
