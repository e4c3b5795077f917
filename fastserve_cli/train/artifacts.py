"""What a training run shows people: metrics.jsonl, the loss plot, greedy samples and the progress bar."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from fastserve_cli.core.rundir import atomic_write_text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by SIGKILL
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the resumed checkpoint so the file reads like one uninterrupted run."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in kept))


def last_metric(path: Path, key: str) -> float | None:
    values = [r[key] for r in read_metrics(path) if key in r]
    return values[-1] if values else None


def write_samples(model, tokenizer, prompts: list[str], new_tokens: int, out: Path) -> None:
    """Greedy continuations of a few prompts, so a person can see what the model learned."""
    import torch

    from fastserve_cli.models.eos import stop_token_ids

    if not prompts:
        return
    # The serve engine's rule: stop at any token that ends a reply.
    stop_ids = sorted(
        stop_token_ids(model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer=tokenizer)
    )
    was_training = model.training
    model.eval()
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1 << 30)
    parts = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
            budget = min(new_tokens, context - ids.shape[1])
            if budget < 1:
                continue
            out_ids = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
            )
            parts.append(f"### prompt: {prompt!r}\n{tokenizer.decode(out_ids[0], skip_special_tokens=False)}\n")
    model.train(was_training)
    atomic_write_text(out, "\n".join(parts))


def write_loss_plot(metrics_path: Path, out: Path) -> None:
    """Training and validation loss against step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)


@contextmanager
def progress_bar(
    show: bool, total: int, done: int, tokens_seen: Callable[[], int]
) -> Iterator[Callable[[int, float], None]]:
    """A rich progress bar with live loss and tokens/s; `advance(step, loss)` moves it (a no-op when hidden)."""
    if not show:
        yield lambda step, loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fastserve_cli.core.console import err_console

    columns = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console(), transient=False) as bar:
        task = bar.add_task("train", total=total, completed=done, loss="-", tps="-")
        t0, s0 = time.time(), tokens_seen()

        def advance(step: int, loss: float) -> None:
            tps = (tokens_seen() - s0) / max(time.time() - t0, 1e-9)
            bar.update(task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")

        yield advance
