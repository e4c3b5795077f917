"""Decode latency of the exported ONNX graph (onnxruntime) vs PyTorch eager, same model, same prompts, one run.

    .venv/bin/python scripts/bench_export.py                 # GPT-2-small shape (124M, random weights)
    .venv/bin/python scripts/bench_export.py --tiny          # 2 layers x 64 wide: a quick smoke run
    .venv/bin/python scripts/bench_export.py --quantize dynamic_int8 int4   # add ORT quantized graphs

The model is built from a config (nothing is downloaded), exported with `fastserve_cli.export.onnx_graph.export_onnx`
(parity enforced), then both backends decode greedily with a KV cache from the same random prompts: after
the prefill, `--new-tokens - 1` single-token steps are timed; each run's median step time, best of `--repeats` runs
(after one warm-up), is reported; the backends take turns in every round. PyTorch runs the HF model in eager mode (default attention, no compile).
Target (issue #5): ORT <= 0.7x PyTorch latency at batch 1 for the GPT-2-small shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from fastserve_cli.testing.models import GPT2_SMALL, TINY, gpt2_config, save_random_model


def build_model(out: Path, tiny: bool, seed: int = 0) -> Path:
    """Random weights, no tokenizer (prompts are random ids): tiny with a 512-id vocabulary, or GPT-2-small."""
    config = gpt2_config(TINY, vocab_size=512, bos_token_id=0, eos_token_id=0) if tiny else gpt2_config(GPT2_SMALL)
    return save_random_model(config, out, seed=seed)


TORCH = "pytorch eager fp32"


def interleaved(model, sessions: dict, prompt: np.ndarray, new_tokens: int, repeats: int) -> dict[str, float]:
    """Best-of-runs median ms/step per backend (`models.measure`, the statistic the optimize report uses),
    the backends taking turns in every round so a load change on a shared machine hits all of them alike."""
    from fastserve_cli.models.measure import interleaved_decode_ms

    return interleaved_decode_ms({TORCH: model, **sessions}, prompt, new_tokens, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 wide instead of the GPT-2-small shape")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quantize",
        nargs="*",
        default=[],
        choices=["dynamic_int8", "int4"],
        help="also time these onnxruntime quantized graphs",
    )
    parser.add_argument(
        "--optimize", action="store_true", help="also time the graph fused by onnxruntime's transformer optimizer"
    )
    parser.add_argument("--threads", type=int, help="intra-op threads for both backends (default: each library's own)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    import onnxruntime
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve_cli.export.onnx_graph import export_onnx
    from fastserve_cli.export.onnx_quant import VARIANT_FILES, quantize
    from fastserve_cli.export.stage import optimize_graph
    from fastserve_cli.models.onnx import OnnxCausalLM, onnx_size_bytes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model", args.tiny)
        start = time.perf_counter()
        parity = export_onnx(model_dir, tmp / "onnx", parity_steps=32)
        export_s = time.perf_counter() - start
        if not parity["passed"]:
            raise SystemExit(f"parity failed: {json.dumps(parity)}")
        graphs = {"onnxruntime fp32": tmp / "onnx" / "model.onnx"}
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        if args.optimize:
            graphs["onnxruntime fp32 fused"] = tmp / "onnx" / "model_fused.onnx"
            optimize_graph(graphs["onnxruntime fp32"], graphs["onnxruntime fp32 fused"], model)
        for name in args.quantize:
            graphs[f"onnxruntime {name}"] = tmp / "onnx" / VARIANT_FILES[name]
            quantize(name, graphs["onnxruntime fp32"], graphs[f"onnxruntime {name}"])
        size_mb = onnx_size_bytes(graphs["onnxruntime fp32"]) / 1e6
        if args.threads:
            torch.set_num_threads(args.threads)
        sessions = {label: OnnxCausalLM(path, threads=args.threads) for label, path in graphs.items()}
        rng = np.random.default_rng(0)
        results = []
        for batch in args.batches:
            prompt = rng.integers(0, model.config.vocab_size, (batch, args.prompt_tokens), dtype=np.int64)
            best = interleaved(model, sessions, prompt, args.new_tokens, args.repeats)
            for label, ms in best.items():
                results.append({"backend": label, "batch": batch, "ms_per_step": ms, "ratio": ms / best[TORCH]})

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: GPT-2 {'tiny' if args.tiny else 'small shape'}, {params / 1e6:.1f}M params; export {export_s:.1f}s, "
        f"parity max|Δlogits| {parity['max_abs_diff']:.2e}, greedy 32 steps identical; "
        f"fp32 graph {size_mb:.1f} MB"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {onnxruntime.__version__} ({args.threads or 'default'} threads); load average {os.getloadavg()[0]:.1f}; prompt {args.prompt_tokens}, {args.new_tokens - 1} timed steps, best of {args.repeats}"
    )
    print(f"{'backend':<26}{'batch':>6}{'ms/step':>10}{'tokens/s':>10}{'latency vs PyTorch':>20}")
    for r in results:
        print(
            f"{r['backend']:<26}{r['batch']:>6}{r['ms_per_step']:>10.2f}{r['batch'] * 1000 / r['ms_per_step']:>10.1f}"
            f"{r['ratio']:>19.3f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"parity": parity, "results": results}, indent=2))


if __name__ == "__main__":
    main()
