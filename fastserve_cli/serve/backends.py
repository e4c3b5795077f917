"""Backends: `load_backend` picks one. The interface and the decode pack are in backend_base.py, the torch
backend in torch_backend.py, the onnxruntime one in onnx_backend.py."""

from __future__ import annotations

from pathlib import Path

from fastserve_cli.core.errors import UserError
from fastserve_cli.serve.backend_base import IN_PACK, Backend, PackedBatch, read_config
from fastserve_cli.serve.onnx_backend import OnnxBackend
from fastserve_cli.serve.torch_backend import TorchBackend

__all__ = ["IN_PACK", "Backend", "OnnxBackend", "PackedBatch", "TorchBackend", "load_backend", "read_config"]


def load_backend(
    kind: str, model_dir: Path, threads: int | None = None, fast_kernels: bool = True, dtype: str = "fp32"
) -> Backend:
    if kind == "torch":
        return TorchBackend(model_dir, fast_kernels=fast_kernels, dtype=dtype)
    if dtype != "fp32":
        raise UserError(
            f"serve.dtype {dtype}: only the torch backend computes in bf16; the onnx graph keeps the "
            "precision it was exported in (use dtype fp32)"
        )
    if kind == "onnx":
        return OnnxBackend(model_dir, threads=threads)
    raise UserError(f"--backend {kind}: unknown backend; choose torch or onnx")
