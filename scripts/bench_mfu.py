"""Model FLOP utilisation of large-batch decode: the engine's decode step against this machine's GEMM peak.

Decode at batch 64 is compute-bound (each weight byte read serves 64 rows), so its rate can be put against
the best a matmul reaches here. Everything is measured in the same run, fp32 and bf16:
- peak: the best of a few large square matmuls per dtype on --threads threads, through torch's matmul and through
  the oneDNN-packed linear the engine uses (whichever is faster);
- decode: fastserve's in-process engine (build_engine, fcfs, as scripts/bench_peers.py) on the
  GPT-2-small shape (124M, random init), --batch requests of --prompt-tokens tokens; once all are
  decoding, --steps engine steps are timed (each makes one token per request, EOS ignored), interleaved
  over --rounds rounds (median and spread);
- model FLOPs per decode token = 2 x non-embedding parameters + attention (4 x layers x width x context,
  the mean context of the timed steps); a second column adds the LM head's matmul (2 x vocab x width),
  which the engine computes too;
- a torch profiler breakdown of a batch-`--batch` decode step per dtype (mean of 3): weight GEMMs (oneDNN packed
  linear, mm/addmm), attention (SDPA, or the bmm + softmax of models/kernels.decode_attention), the rest.

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_mfu.py [--rounds 3] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

# Weight GEMMs (the packed linears, or mm/addmm where a layer is not packed). In GPT-2 decode every bmm is
# attention's (q k^T and p v in models/kernels.decode_attention), so bmm counts as attention.
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::linear", "mkldnn::_linear_pointwise")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax", "aten::bmm")


def gemm_peak(dtype: str, threads: int, sizes=(2048, 3072), repeats: int = 3) -> float:
    """Best FLOP/s of square matmuls of `sizes` in `dtype` on `threads` threads, through torch's default matmul
    (MKL for fp32, which on this AMD CPU stays well below the FMA units' rate) and through the oneDNN-packed
    linear the serve backend uses: the peak is the best either reaches, so MFU cannot pass 100%."""
    import torch

    from fastserve_cli.models.kernels import onednn_linears

    torch.set_num_threads(threads)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
        packed = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False, dtype=kind))
        onednn_linears(packed)
        with torch.inference_mode():
            for fn, args in ((torch.matmul, (a, b)), (packed, (a,))):
                fn(*args)
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn(*args)
                    best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def packed_linear_rate(dtype: str, rows: int, width: int, inner: int, vocab: int, repeats: int = 5) -> float:
    """FLOP/s of the decode step's matmul shapes alone (rows x width -> 3w, w, inner, w and the LM head) through
    the serve backend's oneDNN-packed layers: how near the GEMMs themselves get to the square peak."""
    import torch

    from fastserve_cli.models.kernels import onednn_linears

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    shapes = [(3 * width, width), (width, width), (inner, width), (width, inner), (vocab, width)]
    layers = torch.nn.Sequential(*(torch.nn.Linear(k, n, bias=n != vocab, dtype=kind) for n, k in shapes))
    onednn_linears(layers)
    xs = [torch.randn(rows, k, dtype=kind) for _, k in shapes]
    flops = sum(2 * rows * n * k for n, k in shapes)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for layer, x in zip(layers, xs):
                layer(x)
            best = min(best, time.perf_counter() - start)
    return flops / best


def model_flops(config: dict, context: float) -> tuple[float, float]:
    """(2 x non-embedding params + attention, the same + the LM head) FLOPs per decode token."""
    layers, width, vocab = config["n_layer"], config["n_embd"], config["vocab_size"]
    inner = config.get("n_inner") or 4 * width
    per_layer = 4 * width * width + 4 * width + 2 * width * inner + inner + width + 4 * width  # attn, mlp, 2 LN
    non_embedding = layers * per_layer + 2 * width  # + final LN
    base = 2 * non_embedding + 4 * layers * width * context
    return base, base + 2 * vocab * width


class DecodeProbe:
    """One engine per dtype; `prime` fills the batch and prefills it, `timed` runs decode steps."""

    def __init__(self, model_dir: Path, dtype: str, threads: int, batch: int) -> None:
        from fastserve_cli.testing.peers import FastserveRunner

        self.runner = FastserveRunner(f"torch {dtype}", model_dir, "torch", dtype, threads, batch)
        self.engine = self.runner.engine
        self.batch = batch

    def prime(self, prompts: list[list[int]], new_tokens: int):
        from fastserve_cli.serve.request import Request, SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        self.reqs = [Request(list(p), params, time.perf_counter()) for p in prompts]
        self.engine.submit(self.reqs)
        while not all(r.output_ids for r in self.reqs):
            self.engine.step()

    def timed(self, steps: int) -> tuple[float, float]:
        """(decode tokens/s, mean context) over `steps` engine steps that each decode every request."""
        before = sum(len(r.output_ids) for r in self.reqs)
        context = statistics.mean(len(r.prompt_ids) + len(r.output_ids) for r in self.reqs)
        start = time.perf_counter()
        for _ in range(steps):
            self.engine.step()
        elapsed = time.perf_counter() - start
        made = sum(len(r.output_ids) for r in self.reqs) - before
        assert made == steps * self.batch, (made, steps, self.batch)
        return made / elapsed, context + steps / 2

    def finish(self) -> None:
        while not all(r.finished for r in self.reqs):
            self.engine.step()

    def profile(self, steps: int = 3) -> dict[str, float]:
        """Self CPU time (ms) per decode step by class (gemm, attention, rest), the mean of `steps` steps:
        on a shared machine a single step can catch a thread descheduled inside a small op."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                self.engine.step()
        parts = {"gemm": 0.0, "attention": 0.0, "rest": 0.0}
        for event in prof.key_averages():
            name = event.key
            kind = "gemm" if name in GEMM_OPS else "attention" if any(tag in name for tag in ATTENTION_OPS) else "rest"
            parts[kind] += event.self_cpu_time_total / 1000 / steps
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        parts["top"] = ", ".join(f"{e.key} {e.self_cpu_time_total / 1000 / steps:.1f}" for e in top)
        return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench/gpt2-124m"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="Timed decode steps per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()

    import json

    import torch
    from transformers import AutoTokenizer

    from fastserve_cli.testing.models import gpt2_small_dir

    torch.set_num_threads(args.threads)
    model_dir = gpt2_small_dir(args.model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from fastserve_cli.testing.corpus import stdlib_texts

    ids = tokenizer("\n".join(stdlib_texts())).input_ids
    prompts = [ids[i * 40 : i * 40 + args.prompt_tokens] for i in range(args.batch)]
    dtypes = args.dtypes.split(",")
    probes = {d: DecodeProbe(model_dir, d, args.threads, args.batch) for d in dtypes}
    new_tokens = 2 + (args.rounds + 1) * args.steps + 4
    for probe in probes.values():  # warm-up round (kernel builds per row count), untimed
        probe.prime(prompts, new_tokens)
        probe.timed(args.steps)
    speeds: dict[str, list[tuple[float, float]]] = {d: [] for d in dtypes}
    peaks: dict[str, list[float]] = {d: [] for d in dtypes}
    shapes = (args.batch, config["n_embd"], config.get("n_inner") or 4 * config["n_embd"], config["vocab_size"])
    linear_rates: dict[str, list[float]] = {d: [] for d in dtypes}
    for _ in range(args.rounds):
        for d in dtypes:
            peaks[d].append(gemm_peak(d, args.threads))
            linear_rates[d].append(packed_linear_rate(d, *shapes))
            speeds[d].append(probes[d].timed(args.steps))
    breakdown = {d: probes[d].profile() for d in dtypes}
    for probe in probes.values():
        probe.finish()

    print(
        f"GPT-2-small shape ({config['n_layer']} layers, {config['n_embd']} wide, vocab {config['vocab_size']}), "
        f"batch {args.batch}, prompt {args.prompt_tokens}, {args.threads} threads, {args.rounds} rounds x "
        f"{args.steps} decode steps"
    )
    print("| dtype | GEMM peak GFLOP/s | decode tok/s | model GFLOP/s | MFU | MFU with LM head |")
    print("|---|---|---|---|---|---|")
    for d in dtypes:
        peak = max(peaks[d])
        rates = [s for s, _ in speeds[d]]
        context = statistics.mean(c for _, c in speeds[d])
        base, with_head = model_flops(config, context)
        rate = statistics.median(rates)
        print(
            f"| {d} | {peak / 1e9:.1f} ({min(peaks[d]) / 1e9:.1f}-{peak / 1e9:.1f}) | {rate:.0f} "
            f"({min(rates):.0f}-{max(rates):.0f}) | {rate * base / 1e9:.1f} | {rate * base / peak:.1%} "
            f"| {rate * with_head / peak:.1%} |"
        )
    for d in dtypes:
        rate = max(linear_rates[d])
        print(
            f"{d}: the decode step's matmul shapes alone (packed oneDNN, {args.batch} rows): {rate / 1e9:.1f} "
            f"GFLOP/s = {rate / max(peaks[d]):.0%} of the square peak"
        )
    print(
        f"\nmodel FLOPs per token at mean context {context:.0f}: {base / 1e6:.1f} M (+LM head {with_head / 1e6:.1f} M)"
    )
    print(f"\nprofiled batch-{args.batch} decode step (mean of 3), self CPU ms:")
    for d, parts in breakdown.items():
        total = parts["gemm"] + parts["attention"] + parts["rest"]
        print(
            f"  {d}: total {total:.1f}; GEMM {parts['gemm']:.1f} ({parts['gemm'] / total:.0%}), attention "
            f"{parts['attention']:.1f} ({parts['attention'] / total:.0%}), rest {parts['rest']:.1f} "
            f"({parts['rest'] / total:.0%})"
        )
        print(f"    top ops: {parts['top']}")


if __name__ == "__main__":
    main()
