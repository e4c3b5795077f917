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


class Isolated:
    """A runner in a process of its own (spawned), driven through a pipe: engines measured in one process
    share it with the others' thread pools -- idle OpenMP threads that still spin, ONNX Runtime's spinning
    workers -- and ran up to 1.5x slower there than alone. Same three operations as the runner itself."""

    def __init__(self, runner_class: str, *args) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no thread pool inherited by fork
        self.name = args[0]
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_runner, args=(child, runner_class, args), daemon=True)
        self._proc.start()
        self._call("ready")

    def _call(self, method: str, *args):
        self._conn.send((method, args))
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"{self.name}: {value}")
        return value

    def decode(self, ids: list[int], n: int):
        return self._call("decode", ids, n)

    def offline(self, prompts: list[list[int]], n: int):
        return self._call("offline", prompts, n)

    def first_token(self, ids: list[int]) -> float:
        return self._call("first_token", ids)

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=30)


def _serve_runner(conn, runner_class: str, args) -> None:
    """The isolated process: build the runner, then answer (method, args) messages until None."""
    try:
        runner = globals()[runner_class](*args)
    except Exception as exc:  # reported to the parent, which raises it with the engine's name
        conn.send((False, f"{type(exc).__name__}: {exc}"))
        return
    for message in iter(conn.recv, None):
        method, call_args = message
        try:
            conn.send((True, None if method == "ready" else getattr(runner, method)(*call_args)))
        except Exception as exc:
            conn.send((False, f"{type(exc).__name__}: {exc}"))


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

    def __init__(self, name: str, ct2_dir: Path, tokenizer_dir: Path, compute_type: str, threads: int) -> None:
        import ctranslate2
        from transformers import AutoTokenizer

        self.name, self.tokenizer = name, AutoTokenizer.from_pretrained(tokenizer_dir)
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


def llama_cpp_status(llama_src: Path | None) -> str | None:
    """Why llama.cpp cannot run here (None when it can): the bindings and a llama.cpp source tree for its converter."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (`pip install -e .[bench]` compiles llama.cpp: docs/perf.md)"
    if llama_src is None or not (Path(llama_src) / "convert_hf_to_gguf.py").is_file():
        return (
            f"no llama.cpp source tree with convert_hf_to_gguf.py at {llama_src} (--llama-cpp-src or "
            "LLAMA_CPP_SRC; the llama-cpp-python sdist's vendor/llama.cpp is one: docs/perf.md)"
        )
    return None


GGUF_SHIM = """
import runpy, sys
src, argv = sys.argv[1], sys.argv[2:]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base

def pre_tokenizer(self, tokenizer, _known=base.TextModel.get_vocab_base_pre):
    try:
        return _known(self, tokenizer)
    except NotImplementedError:  # a BPE trained here is not in its hash list; GPT-2's byte-level regex is what it uses
        pre = tokenizer.backend_tokenizer.pre_tokenizer.__getstate__()
        if b'"ByteLevel"' in pre and b'"use_regex":true' in pre:
            return "gpt-2"
        raise

base.TextModel.get_vocab_base_pre = pre_tokenizer
sys.argv = [src + "/convert_hf_to_gguf.py", *argv]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_gguf(model_dir: Path, out: Path, outtype: str, llama_src: Path) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py (from a llama.cpp source tree, e.g. the llama-cpp-python sdist's
    vendor/llama.cpp) with two gaps filled: GPT-2 configs written by transformers 5 lack `n_ctx` (a staged copy
    of the config adds it from n_positions), and the converter names pre-tokenizers by a hash of known
    tokenizers' output, so a byte-level BPE trained here is registered as what it is: GPT-2's pre-tokenizer."""
    if out.is_file():
        return out
    stage = out.parent / f"{out.stem}-src"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for item in Path(model_dir).iterdir():
        if item.name != "config.json":
            (stage / item.name).symlink_to(item.resolve())
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    config.setdefault("n_ctx", config["n_positions"])
    (stage / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tmp = out.with_suffix(".tmp.gguf")
    args = [str(stage), "--outtype", outtype, "--outfile", str(tmp)]
    subprocess.run([sys.executable, "-c", GGUF_SHIM, str(llama_src), *args], check=True, stdout=subprocess.DEVNULL)
    tmp.rename(out)
    shutil.rmtree(stage)
    return out


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's bindings of its C API: one context with a unified KV cache for up
    to `max_seqs` sequences, every in-flight sequence in one `llama_decode` per step (as llama-server's parallel
    slots and llama.cpp's `batched` example do), greedy argmax over the logits. Threads: n_threads =
    n_threads_batch = threads. KV cache in llama.cpp's default type (f16)."""

    def __init__(self, name: str, gguf: Path, threads: int, max_seqs: int, n_ctx: int) -> None:
        import llama_cpp as lib

        self.name, self.lib = name, lib
        self._quiet = lib.llama_log_callback(lambda level, text, data: None)  # its load log is hundreds of lines
        lib.llama_log_set(self._quiet, None)
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max, params.kv_unified = n_ctx, n_ctx, max_seqs, True
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def _step(self, rows: list[tuple[list[int], int, int]]) -> list[int]:
        """One llama_decode over (tokens, first position, sequence) rows; -> the argmax after each row's last."""
        import numpy as np

        b, n = self.batch, 0
        for tokens, pos, seq in rows:
            for j, tok in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = tok, pos + j, 1, seq
                b.logits[n] = j == len(tokens) - 1
                n += 1
        b.n_tokens = n
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(len(rows) * self.vocab,))
        return logits.reshape(len(rows), self.vocab).argmax(axis=1).tolist()

    def _run(self, prompts: list[list[int]], n: int):
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        outs = [[t] for t in self._step([(p, 0, s) for s, p in enumerate(prompts)])]
        times = [time.perf_counter()]
        for _ in range(n - 1):
            rows = [([o[-1]], len(p) + len(o) - 1, s) for s, (p, o) in enumerate(zip(prompts, outs))]
            for o, t in zip(outs, self._step(rows)):
                o.append(t)
            times.append(time.perf_counter())
        return outs, times

    def decode(self, ids: list[int], n: int):
        (out,), times = self._run([ids], n)
        return out, (n - 1) / (times[-1] - times[0])

    def offline(self, prompts: list[list[int]], n: int):
        t0 = time.perf_counter()
        outs, _ = self._run(prompts, n)
        return outs, sum(len(o) for o in outs) / (time.perf_counter() - t0)

    def first_token(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self._run([ids], 1)
        return time.perf_counter() - t0
