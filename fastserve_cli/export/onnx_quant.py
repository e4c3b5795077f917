"""Quantized variants of the exported fp32 graph, and the measurements their report rows need.

Variants (each a graph beside `model.onnx` that shares its config and tokenizer files):
- `model_dynamic_int8.onnx`: `quantize_dynamic`, int8 weights per channel; activations are quantized on
  the fly per batch, so no calibration is needed.
- `model_static_int8.onnx`: `quantize_static` in QDQ format, weights per channel, activation ranges
  calibrated (MinMax) on validation blocks. Each calibration feed is the second half of a block decoded
  against the KV cache of its first half, so the past/present tensors see real ranges too.
- `model_int4.onnx`: 4-bit weight-only `MatMulNBits` (symmetric, per block of `block_size` inputs,
  accuracy level 4 = int8 compute on CPU); activations stay fp32.

All of them keep the fp32 graph's inputs and outputs, so `OnnxCausalLM` runs any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastserve_cli.models.onnx import OnnxCausalLM, position_ids_from_mask

VARIANT_FILES = {
    "dynamic_int8": "model_dynamic_int8.onnx",
    "static_int8": "model_static_int8.onnx",
    "int4": "model_int4.onnx",
}
# The weight matmuls (GPT-2's Conv1D and Llama's Linear both export as MatMul; Gemm for safety).
WEIGHT_OPS = ["MatMul", "Gemm"]


def _needs_external_data(path: Path) -> bool:
    from fastserve_cli.export.onnx_graph import EXTERNAL_DATA_THRESHOLD
    from fastserve_cli.models.onnx import onnx_size_bytes

    return onnx_size_bytes(path) > EXTERNAL_DATA_THRESHOLD


def quantize_dynamic_int8(src: Path, dst: Path, **_: Any) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=WEIGHT_OPS,
        per_channel=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=_needs_external_data(src),
    )


def calibration_feeds(src: Path, blocks: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """One feed per block: its second half as a decode step over the fp32 KV cache of its first half."""
    session = OnnxCausalLM(src)
    feeds = []
    for block in blocks:
        ids = np.array([block], np.int64)
        half = ids.shape[1] // 2
        mask = np.ones_like(ids)
        _, past = session.step(ids[:, :half], mask[:, :half], position_ids_from_mask(mask[:, :half]))
        positions = np.arange(half, ids.shape[1], dtype=np.int64)[None]
        feeds.append(
            {
                "input_ids": ids[:, half:],
                "attention_mask": mask,
                "position_ids": positions,
                **dict(zip(session.past_names, past)),
            }
        )
    return feeds


def quantize_static_int8(src: Path, dst: Path, calibration: list[list[int]] | None = None, **_: Any) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]):
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        src,
        dst,
        Reader(calibration_feeds(src, calibration)),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=WEIGHT_OPS,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        use_external_data_format=_needs_external_data(src),
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )


def quantize_int4(
    src: Path, dst: Path, block_size: int = 32, exact_weights: dict | None = None, report: dict | None = None, **_: Any
) -> None:
    """MatMulNBits int4. With `exact_weights` (models/int4_dense.py: a weight-only int4 variant exported
    dense), a weight found there keeps its own int4 values and scales (GPTQ's, say) instead of being
    re-quantized; `report["exact"]` counts those."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from fastserve_cli.export.onnx_graph import save_model

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4
    )
    if exact_weights:
        node_quantizer = quantizer.node_quantizer  # onnxruntime's DefaultWeightOnlyQuantizer
        node_quantizer.qbits_block_quant = _exact_block_quant(
            node_quantizer.qbits_block_quant, exact_weights, block_size, report if report is not None else {}
        )
    quantizer.process()
    save_model(quantizer.model.model, dst)


def _exact_block_quant(original: Callable, exact: dict, block_size: int, report: dict) -> Callable:
    """Wrap onnxruntime's block quantizer: weights in `exact` with this block size get their own int4."""
    from fastserve_cli.models.int4_dense import weight_key

    def quantize_block(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        packed, scales, zero_points = original(weight)
        found = exact.get(weight_key(weight)) if weight.ndim == 2 else None
        if found is None or found[2] != block_size or packed.ndim != 3:
            return packed, scales, zero_points
        q, scale, _ = found  # q: uint8 0..15 [N, K] (value = (q - 8) * scale, MatMulNBits' symmetric zero 8)
        n, k_blocks, blob = packed.shape
        pairs = q.reshape(n, k_blocks, blob, 2)
        packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
        report["exact"] = report.get("exact", 0) + 1
        return packed, scale.astype(scales.dtype).reshape(scales.shape), zero_points

    return quantize_block


QUANTIZERS: dict[str, Callable[..., None]] = {
    "dynamic_int8": quantize_dynamic_int8,
    "static_int8": quantize_static_int8,
    "int4": quantize_int4,
}


def quantize(name: str, src: Path, dst: Path, **options: Any) -> None:
    """Write the `name` variant of the fp32 graph `src` to `dst`.

    Runs on a copy whose shared (tied) weights are materialized again, since the quantizers only touch
    weights stored as initializers; onnxruntime.quantization's advice on the root logger is muted.
    """
    import logging
    import tempfile

    from fastserve_cli.export.onnx_graph import materialize_shared_weights

    root_logger = logging.getLogger()
    level = root_logger.level
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        plain = materialize_shared_weights(src, Path(tmp) / src.name)
        root_logger.setLevel(logging.ERROR)
        try:
            QUANTIZERS[name](plain, dst, **options)
        finally:
            root_logger.setLevel(level)
