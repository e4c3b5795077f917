#!/usr/bin/env python
"""Training throughput: fastserve's loop vs HF `Trainer` (fp32), same model, data, steps and threads, one run.

The model is GPT-2-shaped (6 layers, 6 heads, 384 wide; `model.size: small`), sequence 256, batch 8,
2 threads, on packed blocks of the stdlib sources made by the real preprocess stage. Both start
from the same random init and train the same steps with AdamW (fused), warmup + cosine and clipping.
Ours runs with each `--ours` precision (`train.mixed_precision`: no = fp32, bf16 = autocast); the
baseline is the fp32 Trainer (`--trainer-bf16` adds a Trainer row with `bf16=True`).
Tokens/s is measured over the steps after `--skip` warm-up steps, from per-step wall-clock stamps
(ours: metrics.jsonl; Trainer: a callback), so set-up, evaluation and saving are excluded for both.
Rounds are interleaved (every row once per round, the order rotating); the median is reported with
the spread. Validation loss: every trained model (first round) is evaluated the same way, in fp32,
on the same `--eval-batches` validation batches.
MFU = model FLOPs/s (6N + attention, per token) / the matmul FLOP/s measured here on 2 threads
(fp32 rows against the fp32 peak, bf16 rows against the bf16 peak).

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_train.py [--steps 40] [--rounds 2] \
        [--ours no,bf16] [--trainer-bf16] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEQ, BATCH, THREADS = 256, 8, 2


def recipe_for(root: Path, steps: int, compile_: bool, precision: str = "no"):
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
                    "mixed_precision": precision,
                },
            }
        ),
        root,
    )


def throughput(stamps: dict[int, float], skip: int, tokens_per_step: int) -> float:
    last = max(stamps)
    return (last - skip) * tokens_per_step / (stamps[last] - stamps[skip])


def run_ours(recipe, run, skip: int) -> tuple[float, object]:
    """Train from scratch (earlier rounds' checkpoints and metrics removed); returns tokens/s and the model."""
    import shutil

    from fastserve_cli.core.pipeline import execute
    from fastserve_cli.models.loader import load_causal_lm

    shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
    shutil.rmtree(run.model_dir, ignore_errors=True)
    run.metrics_path.unlink(missing_ok=True)
    execute("train", recipe, run)
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    stamps = {r["step"]: r["time"] for r in records if "time" in r}
    return throughput(stamps, skip, SEQ * BATCH), load_causal_lm(run.model_dir)


def run_trainer(recipe, run, steps: int, skip: int, out: Path, bf16: bool = False) -> tuple[float, object]:
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
        bf16=bf16,
    )
    torch.set_num_threads(THREADS)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[Stamp()]).train()
    return throughput(stamps, skip, SEQ * BATCH), model


def validation_loss(model, run, batches: int) -> float:
    """Token-weighted next-token loss in fp32 on the first `batches` validation batches."""
    import torch

    from fastserve_cli.core.batches import IGNORE_INDEX, eval_batches, load_splits
    from fastserve_cli.train.loop import summed_token_loss

    _, val = load_splits(run.data_dir)
    model = model.float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(val, BATCH, 0, batches):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(summed_token_loss(logits, batch["labels"]))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10, dtype: str = "fp32") -> float:
    """FLOP/s of a large square matmul on `threads` threads: the denominator of MFU."""
    import torch

    torch.set_num_threads(threads)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="Warm-up steps left out of the timing.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds (median and spread reported).")
    parser.add_argument("--ours", default="bf16", help="Comma list of train.mixed_precision values for our loop.")
    parser.add_argument("--trainer-bf16", action="store_true", help="Also run HF Trainer with bf16=True.")
    parser.add_argument("--eval-batches", type=int, default=16, help="Validation batches (of 8) for the loss.")
    parser.add_argument("--compile", action="store_true", help="Our loop with train.torch_compile (Trainer without).")
    args = parser.parse_args()

    import torch

    from fastserve_cli.core.pipeline import execute, prepare_run_dir
    from fastserve_cli.models.modeling import flops_per_token

    torch.set_num_threads(THREADS)
    rows = [f"fastserve {p if p != 'no' else 'fp32'}" for p in args.ours.split(",")] + ["HF Trainer fp32"]
    if args.trainer_bf16:
        rows.append("HF Trainer bf16")
    speeds: dict[str, list[float]] = {row: [] for row in rows}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = recipe_for(root, args.steps, args.compile)
        run = prepare_run_dir(base)
        execute("preprocess", base, run)
        config = None
        for round_ in range(args.rounds):
            order = rows[round_ % len(rows) :] + rows[: round_ % len(rows)]
            for row in order:
                if row.startswith("fastserve"):
                    precision = "no" if row.endswith("fp32") else row.split()[-1]
                    recipe = base.model_copy(
                        update={"train": base.train.model_copy(update={"mixed_precision": precision})}
                    )
                    speed, model = run_ours(recipe, run, args.skip)
                    config = model.config
                else:
                    speed, model = run_trainer(base, run, args.steps, args.skip, root / "hf", bf16=row.endswith("bf16"))
                speeds[row].append(speed)
                if round_ == 0:
                    losses[row] = validation_loss(model, run, args.eval_batches)
                print(f"round {round_ + 1} {row:18s} {speed:8.0f} tokens/s", flush=True)
    peaks = {dtype: matmul_peak(THREADS, dtype=dtype) for dtype in ("fp32", "bf16")}
    flops = flops_per_token(config, SEQ)
    baseline = statistics.median(speeds["HF Trainer fp32"])
    print(
        f"model: gpt2 small (6 layers, 6 heads, 384 wide), vocab {config.vocab_size}, seq {SEQ}, batch {BATCH}, "
        f"{THREADS} threads, {args.steps} steps (first {args.skip} untimed), {args.rounds} rounds"
    )
    print(
        f"{'row':18s} {'tokens/s median (min-max)':>28s} {'vs Trainer fp32':>16s} {'MFU':>7s} {'val loss':>9s} {'vs fp32':>8s}"
    )
    for row in rows:
        median = statistics.median(speeds[row])
        peak = peaks["bf16" if row.endswith("bf16") else "fp32"]
        spread = f"{median:8.0f} ({min(speeds[row]):.0f}-{max(speeds[row]):.0f})"
        loss_change = losses[row] / losses["HF Trainer fp32"] - 1
        print(
            f"{row:18s} {spread:>28s} {median / baseline:15.2f}x {median * flops / peak:7.1%} "
            f"{losses[row]:9.4f} {loss_change:+8.2%}"
        )
    for row in (r for r in rows if r != "HF Trainer fp32"):
        paired = [f"{a / b:.2f}x" for a, b in zip(speeds[row], speeds["HF Trainer fp32"])]
        print(f"{row} / HF Trainer fp32, round by round: {', '.join(paired)}")
    print("targets: fastserve fp32 >= 1.1x, fastserve bf16 >= 1.4x the fp32 Trainer, val loss within +-1%")
    print(
        f"matmul peak: {peaks['fp32'] / 1e9:.1f} GFLOP/s fp32, {peaks['bf16'] / 1e9:.1f} GFLOP/s bf16 on {THREADS} "
        f"threads; {flops / 1e6:.1f} MFLOP per token"
    )


if __name__ == "__main__":
    main()
