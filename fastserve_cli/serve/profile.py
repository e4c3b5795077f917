"""Prefill-time vs prompt-length profile and the base quantum, for skip-join MLFQ.

Why a profile: skip-join places a new request by its *estimated* first-iteration time, which depends on
this model, backend and machine; FastServe looks it up in a profiling database keyed by input length.
Here the profile is measured once (at server start-up, or by `fastserve serve --profile-only`-style
callers through `ensure_profile`) and cached as JSON in the run directory (`RunDir.serve_profile_path`),
keyed by what it depends on so a different model, backend, batch size or machine re-measures it.

The base quantum is one decode iteration at full batch (the notes' q1): with a smaller quantum every
request would be demoted after its first token, with a larger one the top queue stops separating short
jobs from long ones.
"""

from __future__ import annotations

import bisect
import itertools
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastserve_cli.core.rundir import atomic_write_json, now_iso, read_json

PROFILE_VERSION = 1
DEFAULT_LENGTHS = (1, 8, 32, 64, 128, 256, 512, 1024)


@dataclass
class PrefillProfile:
    """Measured prefill seconds at some prompt lengths, and the decode-iteration time (base quantum)."""

    lengths: list[int]
    prefill_times: list[float]
    decode_s: float
    decode_batch_size: int = 1
    key: dict[str, Any] = field(default_factory=dict)
    measured_at: str = ""

    @property
    def base_quantum_s(self) -> float:
        return self.decode_s

    def prefill_s(self, prompt_len: int) -> float:
        """Estimated prefill seconds: piecewise-linear through the points, linear beyond the ends."""
        xs, ys = self.lengths, self.prefill_times
        if len(xs) == 1:
            return ys[0]
        i = min(max(bisect.bisect_left(xs, prompt_len), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (prompt_len - x0) / (x1 - x0))

    def chunk_tokens(self, budget: int, floor: int = 8, share: float = 0.25) -> int:
        """`serve.prefill_chunk_tokens: auto`: the most prompt tokens whose marginal prefill cost fits in `share`
        of a decode iteration (the base quantum), within the token budget, rounded down to a multiple of `floor`
        (at least `floor`).

        Marginal: prefill_s(n) - prefill_s(1), what n tokens add to an iteration whose weights are read anyway
        -- the torch backend runs a chunk in the decode rows' forward (serve/mixed_forward.py). A quarter of
        a step, because the chunk's attention over the prompt cached so far (not in the profile: it is
        measured from an empty cache) grows as the prefill proceeds: at the end of a 2,000-token prompt it
        cost as much again as the chunk's own tokens. The running streams' inter-token latency then stays
        within about 2x steady while a long prompt prefills."""
        limit = share * self.decode_s

        def fits(n: int) -> bool:
            return self.prefill_s(n) - self.prefill_s(1) <= limit

        if fits(budget):
            return budget
        lo, hi = 1, budget  # prefill_s is non-decreasing: the largest n that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return min(budget, max(floor, lo // floor * floor))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "lengths": self.lengths,
            "prefill_s": self.prefill_times,
            "decode_s": self.decode_s,
            "decode_batch_size": self.decode_batch_size,
            "base_quantum_s": self.base_quantum_s,
            "key": self.key,
            "measured_at": self.measured_at,
        }

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "PrefillProfile":
        data = read_json(path)
        return cls(
            lengths=[int(n) for n in data["lengths"]],
            prefill_times=[float(t) for t in data["prefill_s"]],
            decode_s=float(data["decode_s"]),
            decode_batch_size=int(data.get("decode_batch_size", 1)),
            key=data.get("key", {}),
            measured_at=data.get("measured_at", ""),
        )


def machine_key() -> dict[str, Any]:
    """What makes timings from another machine or thread count invalid here."""
    import torch

    threads = torch.get_num_threads()
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "node": platform.node(),
    }


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up: the cost itself, without other processes' interference."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def measure_profile(
    prefill: Callable[[int], Any],
    decode: Callable[[int], Any],
    max_len: int,
    batch_size: int,
    key: dict[str, Any] | None = None,
    repeats: int = 3,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
) -> PrefillProfile:
    """Time `prefill(prompt_len)` (one request) at each length up to `max_len`, and `decode(batch_size)`.

    `decode(b)` must run one decode iteration for `b` requests; its time is the base quantum.
    """
    points = sorted({min(n, max_len) for n in lengths if n >= 1})
    times = [timed(lambda n=n: prefill(n), repeats) for n in points]
    times = list(itertools.accumulate(times, max))  # prefill time cannot shrink with length; smooth out noise
    decode_s = timed(lambda: decode(batch_size), repeats)
    return PrefillProfile(
        lengths=points,
        prefill_times=times,
        decode_s=decode_s,
        decode_batch_size=batch_size,
        key={**(key or {}), **machine_key(), "batch_size": batch_size},
        measured_at=now_iso(),
    )


def load_cached(path: Path, key: dict[str, Any]) -> PrefillProfile | None:
    """The cached profile at `path` when it was measured for the same key (model, backend, machine)."""
    if not path.is_file():
        return None
    try:
        profile = PrefillProfile.load(path)
    except (ValueError, KeyError, TypeError):
        return None
    wanted = {**key, **machine_key()}
    return profile if all(profile.key.get(k) == v for k, v in wanted.items()) else None


def measure_backend(backend: Any, batch_size: int, repeats: int = 3, decode_context: int = 64) -> PrefillProfile:
    """Profile a serving backend (backends.Backend) through the same prefill/decode calls the engine makes.

    Prompts are made of token id 0..; the decode batch holds `batch_size` requests with `decode_context`
    tokens each. Every cache made here is released, so the backend is left as it was found.
    """
    from fastserve_cli.serve.request import Request, SamplingParams

    def fake(n: int) -> Request:
        return Request(
            prompt_ids=[i % 100 for i in range(n)], params=SamplingParams(max_new_tokens=1), arrival_time=0.0
        )

    def prefill(n: int) -> None:
        req = fake(n)
        backend.prefill(req)
        backend.release(req)

    # The timed decodes (one warm-up + `repeats`) advance every row by one position each: the rows' context
    # must leave that room, or a model with a short context (block_size 64, or 8) decodes past its positions.
    max_context = int(backend.max_context)
    repeats = max(1, min(repeats, max_context // 2 - 1))
    decode_context = max(1, min(decode_context, max_context - repeats - 1))
    rows = [fake(decode_context) for _ in range(batch_size)]
    for req in rows:
        backend.prefill(req)
        req.output_ids.append(0)
    try:
        max_len = max(1, max_context - repeats - 2)
        key = {"model": str(Path(backend.model_dir).resolve()), "backend": backend.name}
        return measure_profile(prefill, lambda b: backend.decode(rows), max_len, batch_size, key, repeats)
    finally:
        for req in rows:
            backend.release(req)
        backend.packed = None


def ensure_profile(backend: Any, path: Path | None, batch_size: int) -> PrefillProfile:
    """The cached profile at `path` if it fits this backend and machine, else a fresh one (saved to `path`)."""
    key = {"model": str(Path(backend.model_dir).resolve()), "backend": backend.name, "batch_size": batch_size}
    cached = load_cached(path, key) if path is not None else None
    if cached is not None:
        return cached
    profile = measure_backend(backend, batch_size)
    if path is not None:
        profile.save(path)
    return profile
