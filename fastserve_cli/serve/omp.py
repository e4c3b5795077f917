"""How idle OpenMP threads wait, chosen before torch loads its OpenMP runtime.

torch's CPU kernels run on libgomp threads. By default an idle libgomp thread spins for a while before it
sleeps; on a machine whose cores are shared (other processes, containers with CPU quotas, a VM's noisy
neighbours), a spinning thread burns the time slice its sibling needs, and every parallel region of a decode
step then waits for a descheduled thread. Measured on this project's shared 2-core VM (docs/perf.md): a
decode step of a 12-layer model whose matmuls are negligible took 13-140 ms with the default policy and
6.7-12.6 ms with `OMP_WAIT_POLICY=PASSIVE`. So the serving commands default to PASSIVE; a dedicated machine
can ask for spinning with `OMP_WAIT_POLICY=ACTIVE` (an explicit setting is always kept).
"""

from __future__ import annotations

import os
import sys

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def prefer_passive_omp_wait() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a wait policy; True when it was set.

    libgomp reads its environment once, when it is loaded (with torch), so after that this does nothing.
    """
    if any(name in os.environ for name in WAIT_VARIABLES) or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
