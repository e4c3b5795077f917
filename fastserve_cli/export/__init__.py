"""`fastserve export`: ONNX with KV cache, verified against PyTorch with onnxruntime."""

from fastserve_cli.export.stage import run_export

__all__ = ["run_export"]
