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

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastserve_cli.models.onnx import OnnxCausalLM, position_ids_from_mask

VARIANT_FILES = {"dynamic_int8": "model_dynamic_int8.onnx", "static_int8": "model_static_int8.onnx",
                 "int4": "model_int4.onnx"}
# The weight matmuls (GPT-2's Conv1D and Llama's Linear both export as MatMul; Gemm for safety).
WEIGHT_OPS = ["MatMul", "Gemm"]


def _needs_external_data(path: Path) -> bool:
    from fastserve_cli.models.onnx import EXTERNAL_DATA_THRESHOLD, onnx_size_bytes

    return onnx_size_bytes(path) > EXTERNAL_DATA_THRESHOLD


def quantize_dynamic_int8(src: Path, dst: Path, **_: Any) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, op_types_to_quantize=WEIGHT_OPS, per_channel=True, weight_type=QuantType.QInt8,
                     use_external_data_format=_needs_external_data(src))


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
        feeds.append({"input_ids": ids[:, half:], "attention_mask": mask, "position_ids": positions,
                      **dict(zip(session.past_names, past))})
    return feeds


def quantize_static_int8(src: Path, dst: Path, calibration: list[list[int]] | None = None, **_: Any) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]):
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(src, dst, Reader(calibration_feeds(src, calibration)), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=WEIGHT_OPS, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, use_external_data_format=_needs_external_data(src),
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def quantize_int4(src: Path, dst: Path, block_size: int = 32, **_: Any) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from fastserve_cli.models.onnx import save_model

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    save_model(quantizer.model.model, dst)


QUANTIZERS: dict[str, Callable[..., None]] = {
    "dynamic_int8": quantize_dynamic_int8, "static_int8": quantize_static_int8, "int4": quantize_int4,
}


def quantize(name: str, src: Path, dst: Path, **options: Any) -> None:
    """Write the `name` variant of the fp32 graph `src` to `dst`.

    Runs on a copy whose shared (tied) weights are materialized again, since the quantizers only touch
    weights stored as initializers; onnxruntime.quantization's advice on the root logger is muted.
    """
    import logging
    import tempfile

    from fastserve_cli.models.onnx import materialize_shared_weights

    root_logger = logging.getLogger()
    level = root_logger.level
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        plain = materialize_shared_weights(src, Path(tmp) / src.name)
        root_logger.setLevel(logging.ERROR)
        try:
            QUANTIZERS[name](plain, dst, **options)
        finally:
            root_logger.setLevel(level)


# ------------------------------------------------------------------ measurements


def perplexity(session: OnnxCausalLM, blocks: list[dict[str, list[int]]]) -> float:
    """Validation perplexity computed by `report.torch_perplexity` itself, so ONNX and PyTorch rows
    share one definition (batching, label masking, NLL): the session is adapted to `model(...).logits`."""
    from types import SimpleNamespace

    import torch

    from fastserve_cli.optimize.report import torch_perplexity

    def forward(input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> SimpleNamespace:
        mask = attention_mask.numpy()
        logits, _ = session.step(input_ids.numpy(), mask, position_ids_from_mask(mask))
        return SimpleNamespace(logits=torch.from_numpy(logits))

    return torch_perplexity(forward, blocks)


def decode_ms_per_token(session: OnnxCausalLM, prompt: np.ndarray, new_tokens: int, repeats: int = 3,
                        warmup: bool = True) -> float:
    """Best mean ms per greedy decode step after the prefill (one warm-up run, then `repeats` timed ones).

    `prompt` is [batch, len] with no padding; `fastserve_cli.optimize.report` measures PyTorch the same way at batch 1.
    """
    batch, length = prompt.shape
    steps = max(1, new_tokens - 1)
    best = float("inf")
    for run in range(0 if warmup else 1, repeats + 1):
        mask = np.ones_like(prompt)
        logits, past = session.step(prompt, mask, position_ids_from_mask(mask))
        token = logits[:, -1].argmax(-1)[:, None]
        start = time.perf_counter()
        for i in range(steps):
            mask = np.ones((batch, length + i + 1), np.int64)
            logits, past = session.step(token, mask, np.full((batch, 1), length + i, np.int64), past)
            token = logits[:, -1].argmax(-1)[:, None]
        if run:
            best = min(best, (time.perf_counter() - start) / steps)
    return best * 1000.0


def greedy_agreement(reference: OnnxCausalLM, candidate: OnnxCausalLM, vocab_size: int, steps: int,
                     seed: int = 0) -> dict[str, float]:
    """How far a quantized graph drifts from fp32: max |Δlogits| and the share of matching greedy tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(1, 16), dtype=np.int64)
    mask = np.ones_like(ids)
    ref_tokens, ref_logits = reference.generate_greedy(ids, mask, steps)
    got_tokens, got_logits = candidate.generate_greedy(ids, mask, steps)
    diff = float(np.abs(ref_logits[0] - got_logits[0]).max())  # first step: same inputs for both
    same = ref_tokens[0] == got_tokens[0]
    first_mismatch = int(np.argmin(same)) if not same.all() else steps
    return {"first_step_max_abs_diff": diff, "matching_prefix_tokens": first_mismatch, "steps": steps}
