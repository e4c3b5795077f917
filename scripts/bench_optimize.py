"""The optimize report on a GPT-2-small-shaped model (124M): int8/int4 and pruning vs the fp32 baseline.

    .venv/bin/python scripts/bench_optimize.py                       # 124M GPT-2 shape, random weights
    .venv/bin/python scripts/bench_optimize.py --run runs/quickstart # also a trained run's model and data
    .venv/bin/python scripts/bench_optimize.py --tiny                # 2 layers x 64 wide: a smoke run
    .venv/bin/python scripts/bench_optimize.py --threads 1           # steadier when other jobs share the CPU

It runs the real stage (`fastserve_cli.core.pipeline.execute("optimize", ...)`) on a run directory built here:
the model from a config (nothing is downloaded), validation blocks from the stdlib tokenized with a BPE
trained on the spot. The report is the measurement: baseline and variants measured in the same process,
same blocks, same prompt (definitions in fastserve_cli/core/report.py). Perplexity of a random-init model
means little (all variants sit near the vocabulary size); `--run` measures a trained model as well.
Targets (issue #4): dynamic int8 >= 1.8x decode tokens/s at batch 1 and <= 0.3x linear weight bytes;
structured pruning of 30% heads + neurons >= 1.3x; int8 perplexity +<= 3% on a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

from fastserve_cli.testing.corpus import stdlib_sources
from fastserve_cli.testing.models import GPT2_SMALL, TINY, gpt2_config, save_random_model, train_tokenizer
from fastserve_cli.testing.runs import pack_blocks, save_blocks

VARIANTS = [
    {"name": "int8", "method": "dynamic_int8"},
    {"name": "wo-int8", "method": "weight_only_int8"},
    {"name": "wo-int4", "method": "weight_only_int4", "group_size": 128},
    {
        "name": "pruned30",
        "method": "structured",
        "heads_fraction": 0.3,
        "neurons_fraction": 0.3,
        "importance": "weight",
    },
    {"name": "sparse50", "method": "magnitude", "sparsity": 0.5},
    {"name": "pruned30-int8", "method": "dynamic_int8", "source": "pruned30"},
]


def build_run(root: Path, tiny: bool, source_run: Path | None, blocks: int) -> Path:
    """A run dir with preprocess/train marked done: a config-built (or a trained run's) model and data."""
    from fastserve_cli.core.rundir import RunDir

    run = RunDir(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if source_run is not None:
        os.symlink(source_run.resolve() / "model", run.model_dir)
        os.symlink(source_run.resolve() / "data", run.data_dir)
    else:
        texts = stdlib_sources()
        tokenizer = train_tokenizer(texts[::2], vocab_size=8192)
        save_random_model(gpt2_config(TINY if tiny else GPT2_SMALL, tokenizer), run.model_dir, tokenizer)
        validation = pack_blocks(tokenizer, texts[1::2], 256, limit=blocks)  # files the tokenizer was not trained on
        save_blocks(validation, validation, run.data_dir)
    run.update_stage("preprocess", status="done", run_id="bench")
    run.update_stage("train", status="done", run_id="bench")
    return run.root


def run_report(root: Path, name: str, args: argparse.Namespace) -> dict:
    from fastserve_cli.core.pipeline import execute
    from fastserve_cli.core.recipe import validate_recipe
    from fastserve_cli.core.report import load_report, print_report

    recipe = validate_recipe(
        {
            "name": name,
            "run_dir": str(root),
            "optimize": {
                "eval_blocks": args.eval_blocks,
                "latency_prompt_tokens": 32,
                "latency_new_tokens": args.new_tokens,
                "latency_repeats": args.repeats,
                "variants": VARIANTS,
            },
        },
        "bench",
    )
    from fastserve_cli.core.rundir import RunDir

    execute("optimize", recipe, RunDir(root))
    report = load_report(RunDir(root))
    print_report(report)
    return report


def targets(report: dict) -> list[str]:
    rows = {r["name"]: r for r in report["rows"]}
    int8, pruned = rows["int8"]["ratios"], rows["pruned30"]["ratios"]
    check = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return [
        f"dynamic int8 decode speedup {int8['speedup']:.2f}x (target >= 1.8x): {check(int8['speedup'] >= 1.8)}",
        f"dynamic int8 linear weight bytes {int8['linear_size']:.3f}x (target <= 0.3x): {check(int8['linear_size'] <= 0.3)}",
        f"dynamic int8 perplexity {int8['perplexity'] - 1:+.2%} (target <= +3% on a trained model)",
        f"structured 30% heads+neurons speedup {pruned['speedup']:.2f}x (target >= 1.3x): {check(pruned['speedup'] >= 1.3)}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fastserve-bench-optimize"))
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 wide instead of the 124M shape")
    parser.add_argument("--run", type=Path, help="a trained run directory (model/ + data/) to measure as well")
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="torch threads (1 is steadier on a busy shared CPU; default: all cores)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the variants (they are large)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )
    summary = {}
    jobs = [("gpt2-124m-random" if not args.tiny else "gpt2-tiny-random", None)]
    if args.run is not None:
        jobs.append((f"trained-{args.run.name}", args.run))
    for name, source in jobs:
        root = build_run(args.workdir / name, args.tiny, source, args.eval_blocks)
        report = run_report(root, name, args)
        lines = targets(report)
        print("\n".join(f"{name}: {line}" for line in lines))
        summary[name] = {"rows": report["rows"], "targets": lines}
        if not args.keep:
            shutil.rmtree(root / "optimized", ignore_errors=True)
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"full reports: {args.workdir}/summary.json", file=sys.stderr)


if __name__ == "__main__":
    main()
