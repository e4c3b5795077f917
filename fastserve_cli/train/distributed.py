"""Process-group helpers: rank, world size and collectives that are no-ops in one process.

Rank and world size come from the launcher's environment rather than from accelerate because
accelerate 1.15 reports a single process for DeepSpeed on a GPU-less machine even when
torch.distributed has two; collectives therefore go through torch.distributed directly.
"""

from __future__ import annotations

import os
from typing import Any


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over all processes (a no-op with one); float64 so token counts stay exact."""
    if world_size() == 1:
        return values
    import torch
    import torch.distributed as dist

    device = "cuda" if cuda_available() and dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def ensure_single_process_env() -> None:
    """DeepSpeed initialises torch.distributed even alone; give it a rendezvous on a free port."""
    import socket

    if "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
