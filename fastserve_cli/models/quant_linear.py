"""The quantized linear modules (int8 dynamic, int8 weight-only, int4 weight-only) and the tensors they save.

Shared by the fastserve format (quantized.py) and the compressed-tensors format (ct_format.py), so neither
format module imports the other's internals.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHT_FILE = "model.safetensors"


def _module_base():
    from torch import nn

    return nn.Module


class QuantLinear(_module_base()):
    """Common part of the quantized linears: shapes, bias, and the tensors they are saved as."""

    def __init__(self, in_features: int, out_features: int, bias: "torch.Tensor | None"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", bias, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def saved_tensors(self) -> dict[str, "torch.Tensor"]:
        raise NotImplementedError


# From this many rows on (prefills, batches of 32+), the dynamic int8 matmul runs on oneDNN's kernels instead of
# fbgemm's: on this CPU (2 threads, medians) 1,024 rows x 768 -> 2304/3072 and 3072 -> 768 took 4.2/2.9/3.7 ms on
# oneDNN against 5.9/5.8/8.1 ms on fbgemm, and the 50,257-wide head at 64 rows 3.6 against 9.9 ms; at one row
# fbgemm is faster (the head 0.58 vs 0.74 ms), at 64 rows the layers are even.
ONEDNN_MIN_ROWS = 32


class DynamicInt8Linear(QuantLinear):
    """int8 per-channel weights, activations quantized on the fly (fbgemm; oneDNN from `ONEDNN_MIN_ROWS` rows,
    which costs a second packed copy of the int8 weights in memory), fp32 in and out."""

    def __init__(self, weight: "torch.Tensor", scale: "torch.Tensor", bias: "torch.Tensor | None"):
        import torch

        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # qint8 tensors are deprecated, but fbgemm's dynamic linear still takes them
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero, 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self._packed_rows = _onednn_prepack(qweight, bias)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        wide = self._packed_rows is not None and x.numel() >= ONEDNN_MIN_ROWS * self.in_features
        # reduce_range=True, as quantize_dynamic does on x86, so u8*s8 products never saturate.
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed_rows if wide else self._packed, True).to(
            x.dtype
        )

    def saved_tensors(self) -> dict[str, "torch.Tensor"]:
        return {"weight": self.weight, "weight_scale": self.weight_scale}


def _onednn_prepack(qweight, bias):
    """The weights packed for oneDNN's dynamic int8 linear (the packed object carries its engine), or None
    where torch has no oneDNN quantized engine."""
    import torch

    engines = torch.backends.quantized
    if "onednn" not in engines.supported_engines or qweight.device.type != "cpu":
        return None
    previous = engines.engine
    try:
        engines.engine = "onednn"  # prepack picks the kernel library from the global engine
        return torch.ops.quantized.linear_prepack(qweight, bias)
    except RuntimeError:
        return None
    finally:
        engines.engine = previous


class WeightOnlyInt8Linear(QuantLinear):
    """int8 per-channel weights; the matmul runs in bf16 without quantizing activations."""

    def __init__(self, weight: "torch.Tensor", scale: "torch.Tensor", bias: "torch.Tensor | None"):
        import torch

        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("_scale_bf16", scale.to(torch.bfloat16), persistent=False)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self._scale_bf16)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out + self.bias if self.bias is not None else out

    def saved_tensors(self) -> dict[str, "torch.Tensor"]:
        return {"weight": self.weight, "weight_scale": self.weight_scale}


class WeightOnlyInt4Linear(QuantLinear):
    """4-bit grouped weights (asymmetric), bf16 matmul through the CPU int4 kernel."""

    def __init__(
        self,
        packed: "torch.Tensor",
        scale: "torch.Tensor",
        zero: "torch.Tensor",
        bias: "torch.Tensor | None",
        group_size: int,
    ):
        import torch

        super().__init__(packed.shape[1] * 2, packed.shape[0], bias)
        self.group_size = group_size
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("weight_zero", zero, persistent=False)
        q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(self.out_features, self.in_features)
        # The kernel wants a multiple of 16 output rows (a 50257-word lm_head is not): pad with zero rows.
        pad = -self.out_features % 16
        q, scale_k, zero_k = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, scale, zero))
        self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # The kernel dequantizes as (q - 8) * scale + zero'; ours is q * scale + zero.
        zero_shifted = zero_k + 8 * scale_k
        self._scales_zeros = torch.stack([scale_k.T, zero_shifted.T], dim=-1).contiguous().to(torch.bfloat16)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self._kernel_weight, self.group_size, self._scales_zeros)
        out = out[:, : self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out + self.bias if self.bias is not None else out

    def saved_tensors(self) -> dict[str, "torch.Tensor"]:
        return {"weight": self.weight, "weight_scale": self.weight_scale, "weight_zero": self.weight_zero}


def distinct_tensors(tensors: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Contiguous tensors, shared storage cloned (embeddings and lm_head may share; safetensors refuses)."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        key = tensor.data_ptr()
        result[name] = tensor.detach().contiguous().clone() if key in seen else tensor.detach().contiguous()
        seen.add(key)
    return result
