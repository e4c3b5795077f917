"""Engines under test for scripts/bench_peers.py: one runner class per engine, the same three operations.

Each runner takes token ids (so every engine sees exactly the same prompts), generates greedily with EOS
ignored for exactly the asked number of tokens, and returns the generated ids:
- `decode(ids, n)` -> (ids, decode tokens/s after the first token);
- `offline(prompts, n)` -> (ids per prompt, generated tokens / wall time), all prompts in flight at once;
- `first_token(ids)` -> seconds until the first generated token (the prompt's prefill).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


class FastserveRunner:
    """Our engine in-process (no HTTP): build_engine with fcfs scheduling, stepped on this thread."""

    def __init__(self, name: str, model_dir: Path, backend: str, dtype: str, threads: int, max_batch: int) -> None:
        from fastserve_cli.core.recipe import ServeConfig
        from fastserve_cli.serve import ServeTarget, build_engine

        cfg = ServeConfig(
            backend=backend,
            dtype=dtype,
            num_threads=threads,
            scheduler="fcfs",
            max_batch_size=max_batch,
            max_num_batched_tokens=max(2048, 64 * max_batch),
            max_queue=4 * max_batch,
            kv_cache_memory="8GiB",
            prefix_cache=False,  # rounds repeat their prompts: a cache hit would not be a like-for-like TTFT
        )
        self.name = name
        self.engine = build_engine(ServeTarget(Path(model_dir), backend, name), cfg).engine

    def _run(self, prompts: list[list[int]], n: int):
        from fastserve_cli.serve.request import Request, SamplingParams

        reqs = [
            Request(list(p), SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True), time.perf_counter())
            for p in prompts
        ]
        self.engine.submit(reqs)
        while not all(r.finished for r in reqs):
            self.engine.step()
        return reqs

    def decode(self, ids: list[int], n: int):
        (req,) = self._run([ids], n)
        return req.output_ids, (n - 1) / (req.last_token_time - req.first_token_time)

    def offline(self, prompts: list[list[int]], n: int):
        t0 = time.perf_counter()
        reqs = self._run(prompts, n)
        return [r.output_ids for r in reqs], sum(len(r.output_ids) for r in reqs) / (time.perf_counter() - t0)

    def first_token(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self._run([ids], 1)
        return time.perf_counter() - t0


def convert_ctranslate2(model_dir: Path, out: Path, quantization: str) -> Path:
    """CTranslate2's own transformers converter, then fill the null keys its Generator refuses ("type must be
    string, but is null"; removing them is not enough): unk_token <- the EOS token, layer_norm_epsilon <- config."""
    if not (out / "model.bin").is_file():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ctranslate2.converters.transformers",
                "--model",
                str(model_dir),
                "--output_dir",
                str(out),
                "--quantization",
                quantization,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        path = out / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        defaults = {"unk_token": config.get("eos_token"), "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5)}
        config = {k: (defaults.get(k) if v is None else v) for k, v in config.items()}
        path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}), encoding="utf-8")
    return out


class CTranslate2Runner:
    """ctranslate2.Generator on the CPU: intra_threads=threads, inter_threads=1, the given compute_type.
    EOS is kept out by min_length = max_length = n (CTranslate2 has no ignore-EOS switch)."""

    def __init__(self, name: str, ct2_dir: Path, tokenizer, compute_type: str, threads: int) -> None:
        import ctranslate2

        self.name, self.tokenizer = name, tokenizer
        self.gen = ctranslate2.Generator(
            str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
        )

    def _tokens(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int], n: int):
        out, times = [], []
        for step in self.gen.generate_tokens(self._tokens(ids), max_length=n, min_length=n, sampling_topk=1):
            out.append(step.token_id)
            times.append(time.perf_counter())
        return out, (len(out) - 1) / (times[-1] - times[0])

    def offline(self, prompts: list[list[int]], n: int):
        t0 = time.perf_counter()
        results = self.gen.generate_batch(
            [self._tokens(p) for p in prompts],
            max_batch_size=len(prompts),
            max_length=n,
            min_length=n,
            sampling_topk=1,
            include_prompt_in_result=False,
        )
        outs = [r.sequences_ids[0] for r in results]
        return outs, sum(len(o) for o in outs) / (time.perf_counter() - t0)

    def first_token(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self.gen.generate_batch(
            [self._tokens(ids)], max_length=1, min_length=1, sampling_topk=1, include_prompt_in_result=False
        )
        return time.perf_counter() - t0


def llama_cpp_status() -> str:
    """Why llama.cpp is not in the table (see docs/perf.md): no runner yet, and its converter rejects this model."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return (
            "llama-cpp-python is not installed (`pip install -e .[bench]` compiles llama.cpp); and its "
            "convert_hf_to_gguf.py rejects this model (no n_ctx; BPE pre-tokenizer not recognized): docs/perf.md"
        )
    return (
        "llama-cpp-python imports, but its convert_hf_to_gguf.py rejects this model (no n_ctx; BPE pre-tokenizer "
        "not recognized), so there is no llama.cpp runner yet: docs/perf.md"
    )
