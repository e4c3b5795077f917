"""Summary statistics shared by the server's simulator and every benchmark.

One percentile definition for all of them, so a P99 in one benchmark's table means what it means in another's.
Pure Python on purpose: the simulator and the benchmark clients should not need numpy for it.
"""

from __future__ import annotations

import math
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default); nan when empty."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
