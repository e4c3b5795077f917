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
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastserve_cli.rundir import atomic_write_json, now_iso, read_json

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

    def to_json(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "lengths": self.lengths, "prefill_s": self.prefill_times,
                "decode_s": self.decode_s, "decode_batch_size": self.decode_batch_size,
                "base_quantum_s": self.base_quantum_s, "key": self.key, "measured_at": self.measured_at}

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "PrefillProfile":
        data = read_json(path)
        return cls(lengths=[int(n) for n in data["lengths"]], prefill_times=[float(t) for t in data["prefill_s"]],
                   decode_s=float(data["decode_s"]),
                   decode_batch_size=int(data.get("decode_batch_size", 1)), key=data.get("key", {}),
                   measured_at=data.get("measured_at", ""))


def machine_key() -> dict[str, Any]:
    """What makes timings from another machine or thread count invalid here."""
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        threads = None
    return {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": threads, "node": platform.node()}


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call (robust to a noisy shared CPU)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_profile(prefill: Callable[[int], Any], decode: Callable[[int], Any], max_len: int, batch_size: int,
                    key: dict[str, Any] | None = None, repeats: int = 3,
                    lengths: tuple[int, ...] = DEFAULT_LENGTHS) -> PrefillProfile:
    """Time `prefill(prompt_len)` (one request) at each length up to `max_len`, and `decode(batch_size)`.

    `decode(b)` must run one decode iteration for `b` requests; its time is the base quantum.
    """
    points = sorted({min(n, max_len) for n in lengths if n >= 1})
    times = [timed(lambda n=n: prefill(n), repeats) for n in points]
    times = [max(t, times[i - 1]) if i else t for i, t in enumerate(times)]  # prefill time is monotone in length
    decode_s = timed(lambda: decode(batch_size), repeats)
    return PrefillProfile(lengths=points, prefill_times=times, decode_s=decode_s, decode_batch_size=batch_size,
                          key={**(key or {}), **machine_key(), "batch_size": batch_size}, measured_at=now_iso())


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
