"""Peer benchmark: fastserve's engine against the CPU engines a user would pick instead, in one run.

Same model (GPT-2-small shape, 124M, random init, our tokenizer layout; built on first use by
fastserve_cli.testing.models.gpt2_small_dir), same prompt token ids, same output lengths with EOS ignored, same thread count:
- fastserve (in-process engine, fcfs): torch fp32, torch bf16 (serve.dtype), torch int8 (optimize's
  dynamic_int8 via fastserve_cli.models.quantized), onnx fp32 (fastserve_cli.export.onnx_graph.export_onnx);
- CTranslate2 (its transformers converter; Generator intra_threads=THREADS, inter_threads=1,
  compute_type float32 / int8 -- its fastest CPU settings here; it has no bf16 on this CPU);
- llama.cpp via llama-cpp-python (its C API: every sequence in one llama_decode per step, unified KV cache),
  converted by llama.cpp's convert_hf_to_gguf.py to f32 and q8_0 (needs a llama.cpp source tree:
  --llama-cpp-src or LLAMA_CPP_SRC, e.g. the llama-cpp-python sdist's vendor/llama.cpp; else it is left out
  and the script says why).
Rows: batch-1 decode tokens/s (after the first token); offline throughput with 16 and 64 requests in
flight (generated tokens / wall time); time to first token of a --ttft-prompt-token prompt. Rounds are
interleaved (every engine once per round), every engine in a process of its own; the median is reported with the
spread (min-max). Ratios:
best fastserve / best peer per row at the same precision (bf16 against the best fp32 peer: no peer has bf16
here). Greedy outputs of the decode row are compared with torch fp32 (matching prefix length).
Quality of bf16 vs fp32: perplexity on held-out stdlib text and greedy agreement over --quality-tokens.

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_peers.py            # a few minutes
    ... scripts/bench_peers.py --rounds 5 --decode-tokens 256 --offline-tokens 128     # a longer run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from fastserve_cli.testing.models import gpt2_small_dir
from fastserve_cli.testing.peers import (
    FastserveRunner,
    Isolated,
    convert_ctranslate2,
    convert_gguf,
    llama_cpp_status,
)

PRECISION = {
    "torch fp32": "fp32",
    "torch bf16": "bf16",
    "torch int8": "int8",
    "onnx fp32": "fp32",
    "ct2 fp32": "fp32",
    "ct2 int8": "int8",
    "llama f32": "fp32",
    "llama q8_0": "int8",
}
LLAMA = {"llama f32": "f32", "llama q8_0": "q8_0"}
OURS = ("torch fp32", "torch bf16", "torch int8", "onnx fp32")


def corpus_ids(tokenizer) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join(
        (stdlib / m).read_text(encoding="utf-8")
        for m in ("argparse.py", "csv.py", "difflib.py", "inspect.py", "typing.py")
    )
    return tokenizer(text).input_ids


def make_variants(model_dir: Path, work: Path, llama_src: Path | None) -> dict[str, Path]:
    """int8 (optimize's dynamic_int8), onnx fp32, CTranslate2's float32/int8 and llama.cpp's f32/q8_0
    conversions (when `llama_src` is given), cached in `work`."""
    from fastserve_cli.export.onnx_graph import export_onnx
    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.models.quantized import quantize_model, save_quantized

    out = {"int8": work / "int8", "onnx": work / "onnx"}
    if not (out["int8"] / "config.json").is_file():
        out["int8"].mkdir(parents=True, exist_ok=True)
        model = load_causal_lm(model_dir)
        save_quantized(model, "dynamic_int8", quantize_model(model, "dynamic_int8"), model_dir, out["int8"])
    if not (out["onnx"] / "model.onnx").is_file():
        parity = export_onnx(model_dir, out["onnx"])
        print(f"onnx export parity: {parity.get('passed', parity)}", flush=True)
    out["ct2 fp32"] = convert_ctranslate2(model_dir, work / "ct2-float32", "float32")
    out["ct2 int8"] = convert_ctranslate2(model_dir, work / "ct2-int8", "int8")
    for name, outtype in LLAMA.items() if llama_src else ():
        out[name] = convert_gguf(model_dir, work / "gguf" / f"model-{outtype}.gguf", outtype, llama_src)
    return out


def load_runners(args, model_dir: Path, paths: dict[str, Path]) -> dict:
    """Every engine in a process of its own (`Isolated`), with the same thread count and OpenMP setting."""
    specs = {
        "torch fp32": ("FastserveRunner", model_dir, "torch", "fp32", args.threads, max(args.offline)),
        "torch bf16": ("FastserveRunner", model_dir, "torch", "bf16", args.threads, max(args.offline)),
        "torch int8": ("FastserveRunner", paths["int8"], "torch", "fp32", args.threads, max(args.offline)),
        "onnx fp32": ("FastserveRunner", paths["onnx"], "onnx", "fp32", args.threads, max(args.offline)),
        "ct2 fp32": ("CTranslate2Runner", paths["ct2 fp32"], model_dir, "float32", args.threads),
        "ct2 int8": ("CTranslate2Runner", paths["ct2 int8"], model_dir, "int8", args.threads),
    }
    longest = max(args.prompt_tokens + args.decode_tokens, args.ttft_prompt + 1)
    n_ctx = max(longest, max(args.offline) * (args.prompt_tokens + args.offline_tokens))
    for name in LLAMA if "llama f32" in paths else ():
        specs[name] = ("LlamaCppRunner", paths[name], args.threads, max(args.offline), n_ctx)
    return {
        name: Isolated(runner_class, name, *rest)
        for name, (runner_class, *rest) in specs.items()
        if name not in args.skip
    }


def measure(runners: dict, ids: list[int], args) -> tuple[dict, dict]:
    """Interleaved rounds; returns {row: {engine: [values]}} and the decode row's greedy outputs."""
    decode_prompt = ids[: args.prompt_tokens]
    offline_prompts = {k: [ids[i * 40 : i * 40 + args.prompt_tokens] for i in range(1, k + 1)] for k in args.offline}
    ttft_prompt = ids[-args.ttft_prompt :]
    rows: dict[str, dict[str, list[float]]] = {}
    outputs: dict[str, list[int]] = {}
    for runner in runners.values():  # untimed warm-up: kernel builds (oneDNN per row count), allocator, caches
        runner.decode(decode_prompt, 4)
        for k in args.offline:
            runner.offline(offline_prompts[k], 2)
        runner.first_token(ttft_prompt)
    for rnd in range(args.rounds):
        for name, runner in runners.items():
            time.sleep(args.settle)  # the engine before may still have threads spinning in its process
            t0 = time.perf_counter()
            out, tps = runner.decode(decode_prompt, args.decode_tokens)
            assert len(out) == args.decode_tokens, (name, len(out))
            outputs[name] = out
            rows.setdefault("batch-1 decode tok/s", {}).setdefault(name, []).append(tps)
            for k in args.offline:
                outs, tps = runner.offline(offline_prompts[k], args.offline_tokens)
                assert all(len(o) == args.offline_tokens for o in outs), name
                rows.setdefault(f"offline {k} in flight tok/s", {}).setdefault(name, []).append(tps)
            ttft = runner.first_token(ttft_prompt)
            rows.setdefault(f"TTFT {len(ttft_prompt)}-token prompt ms", {}).setdefault(name, []).append(1000 * ttft)
            print(f"round {rnd + 1}/{args.rounds} {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return rows, outputs


def quality(model_dir: Path, ids: list[int], tokens: int, threads: int) -> dict:
    """bf16 vs fp32 through the serve backend's model: perplexity over 4 windows of held-out tokens (512, or the
    model's context), and greedy agreement over `tokens` generated tokens for 4 prompts (engine, EOS ignored)."""
    import torch

    results, outs = {}, {}
    for dtype in ("fp32", "bf16"):
        runner = FastserveRunner(f"q-{dtype}", model_dir, "torch", dtype, threads, 4)
        backend = runner.engine.backend
        width = min(512, backend.max_context)
        windows = [ids[i : i + width] for i in range(0, 4 * width, width)]
        with torch.inference_mode():
            losses = [
                backend.model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss.float().item()
                for w in windows
            ]
        results[f"ppl {dtype}"] = round(float(torch.tensor(losses).mean().exp()), 3)
        n = min(tokens, backend.max_context - 32)
        prompts = [ids[3000 + 97 * i : 3000 + 97 * i + 32] for i in range(4)]
        outs[dtype], _ = runner.offline(prompts, n)
    results["ppl change %"] = round(100 * (results["ppl bf16"] / results["ppl fp32"] - 1), 3)
    same = [
        next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(outs["fp32"], outs["bf16"])
    ]
    agree = [sum(a == b for a, b in zip(x, y)) for x, y in zip(outs["fp32"], outs["bf16"])]
    results.update({"tokens": len(outs["fp32"][0]), "greedy matching prefix": same, "greedy same position": agree})
    return results


def fmt(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:8.1f} ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else f"{med:8.1f}"


def report(rows: dict, outputs: dict, skipped: dict[str, str]) -> None:
    names = list(next(iter(rows.values())))
    print("\n| row | " + " | ".join(names) + " | ours/best peer fp32 | int8 | bf16 vs fp32 peer |")
    print("|---|" + "---|" * (len(names) + 3))
    for row, per in rows.items():
        lower = row.startswith("TTFT")
        med = {n: statistics.median(v) for n, v in per.items()}
        ratios = []
        for ours, prec in (("fp32", "fp32"), ("int8", "int8"), ("bf16", "fp32")):
            mine = [med[n] for n in med if n in OURS and PRECISION[n] == ours]
            peer = [med[n] for n in med if n not in OURS and PRECISION[n] == prec]
            if not mine or not peer:
                ratios.append("n/a")
                continue
            best_mine, best_peer = (min(mine), min(peer)) if lower else (max(mine), max(peer))
            ratios.append(f"{(best_peer / best_mine) if lower else (best_mine / best_peer):.2f}x")
        print(f"| {row} | " + " | ".join(fmt(per[n]) for n in names) + " | " + " | ".join(ratios) + " |")
    if "torch fp32" in names and "torch bf16" in names:
        print(
            "\ntorch bf16 / torch fp32 (same engine; TTFT: fp32 time / bf16 time): "
            + ", ".join(
                f"{row}: {_ratio(per['torch bf16'], per['torch fp32'], row.startswith('TTFT')):.2f}x"
                for row, per in rows.items()
            )
        )
    ref = outputs.get("torch fp32")
    if ref:
        print("\ngreedy decode outputs vs torch fp32 (matching prefix / tokens):")
        for name, out in outputs.items():
            same = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), len(ref))
            print(f"  {name}: {same}/{len(ref)}{'  identical' if same == len(ref) else ''}")
    for name, why in skipped.items():
        print(f"not run: {name}: {why}")


def set_omp_wait_policy(policy: str) -> None:
    """Before torch or ctranslate2 is imported: libgomp reads OMP_WAIT_POLICY once, when it is loaded."""
    if policy == "unset":
        return
    if "torch" in sys.modules or "ctranslate2" in sys.modules:
        raise RuntimeError("set OMP_WAIT_POLICY before importing torch/ctranslate2")
    os.environ["OMP_WAIT_POLICY"] = policy.upper()


def _ratio(a: list[float], b: list[float], lower_is_better: bool) -> float:
    ma, mb = statistics.median(a), statistics.median(b)
    return mb / ma if lower_is_better else ma / mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench/gpt2-124m"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench/peers"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--offline", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--offline-tokens", type=int, default=32)
    parser.add_argument("--ttft-prompt", type=int, default=1024)
    parser.add_argument("--quality-tokens", type=int, default=128)
    parser.add_argument(
        "--quality-model",
        type=Path,
        nargs="*",
        default=[],
        help="more model directories (e.g. a trained run's model/) to measure bf16 quality on",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds to wait before each engine's turn: OpenMP runtimes keep idle threads spinning after a "
        "parallel region (Intel's, which CTranslate2 bundles, for 200 ms by default), which would take the cores "
        "from the next engine",
    )
    parser.add_argument("--no-quality", action="store_true", help="leave out the bf16 quality measurement")
    parser.add_argument(
        "--llama-cpp-src",
        type=Path,
        default=os.environ.get("LLAMA_CPP_SRC"),
        help="a llama.cpp source tree (for convert_hf_to_gguf.py), e.g. the llama-cpp-python sdist's vendor/llama.cpp",
    )
    parser.add_argument("--skip", nargs="*", default=[], help="engines to leave out, e.g. 'ct2 int8'")
    parser.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "unset"),
        default="unset",
        help="OMP_WAIT_POLICY for every engine of the run (torch, CTranslate2 and llama.cpp all use OpenMP); unset "
        "(default): the environment's value, i.e. what a user gets; passive: idle OpenMP threads sleep instead of "
        "spinning, which on a machine shared with other work keeps a descheduled thread from stalling every "
        "parallel region, but costs each parallel region a wake-up (docs/perf.md)",
    )
    args = parser.parse_args()
    set_omp_wait_policy(args.omp_wait_policy)

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = gpt2_small_dir(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = corpus_ids(tokenizer)
    skipped = {}
    why = llama_cpp_status(args.llama_cpp_src)
    if why:
        skipped["llama f32/q8_0"] = why
    paths = make_variants(model_dir, args.work_dir, None if why else args.llama_cpp_src)
    runners = load_runners(args, model_dir, paths)
    print(
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} "
        f"threads={args.threads} prompt={args.prompt_tokens} decode={args.decode_tokens} offline={args.offline}x"
        f"{args.offline_tokens} ttft-prompt={args.ttft_prompt} rounds={args.rounds}",
        flush=True,
    )
    rows, outputs = measure(runners, ids, args)
    for runner in runners.values():
        runner.close()
    report(rows, outputs, skipped)
    for path in [] if args.no_quality else [model_dir, *args.quality_model]:
        ids_q = corpus_ids(AutoTokenizer.from_pretrained(path))
        print(f"\nbf16 quality on {path}: {quality(path, ids_q, args.quality_tokens, args.threads)}", flush=True)


if __name__ == "__main__":
    main()
