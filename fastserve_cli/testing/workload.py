"""The serving benchmarks' model and seeded heavy-tailed trace, so the scheduling and cluster benchmarks replay
the same requests to the same model and their numbers compare.

The model is a random-init GPT-2 shape (default 4 layers, 256 wide) with a BPE trained on stdlib sources; the
trace has unit-rate Poisson arrivals, log-normal prompt lengths (median 64 tokens) and heavy-tailed outputs
(85% in [8, 32] tokens, 15% in [256, 512]) with prompts cut from the same stdlib sources at seeded offsets.
"""

from __future__ import annotations

import random
from pathlib import Path

from fastserve_cli.serve.simulate import bimodal_output_len, lognormal_prompt_len
from fastserve_cli.testing.corpus import corpus_ids, cut_prompt, stdlib_texts
from fastserve_cli.testing.models import GPT2Shape, gpt2_model_dir, train_tokenizer
from fastserve_cli.testing.replay import Job

BENCH_CORPUS = [
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "glob.py",
    "shlex.py",
    "argparse.py",
    "typing.py",
    "dataclasses.py",
]


def bench_model_dir(out: Path, layers: int = 4, width: int = 256) -> Path:
    """`out`/model-gpt2-{layers}x{width}: built once (HF layout, safetensors), then reused as it is."""
    return gpt2_model_dir(
        out / f"model-gpt2-{layers}x{width}",
        GPT2Shape(layers, width),
        lambda: train_tokenizer(stdlib_texts(BENCH_CORPUS), vocab_size=4096),
    )


def heavy_tailed_jobs(model_dir: Path, seed: int, count: int) -> list[Job]:
    """`count` jobs with unit-rate Poisson arrivals; replaying at `rate` scales the arrivals by 1/rate, which
    keeps the same requests at every load: loads differ only in how close together they arrive."""
    from transformers import AutoTokenizer

    rng = random.Random(seed)
    t, rows = 0.0, []
    for _ in range(count):
        t += rng.expovariate(1.0)
        rows.append((t, lognormal_prompt_len(rng, median=64, sigma=0.8, cap=384), bimodal_output_len(rng)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, cuts = corpus_ids(tokenizer, BENCH_CORPUS), random.Random(1)
    return [Job(arrival, cut_prompt(tokenizer, ids, length, cuts), out, length) for arrival, length, out in rows]
