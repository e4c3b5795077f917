"""The torch backend: HF models (fp32, bf16, quantized and pruned variants) with the decode pack in
preallocated buffers (`BufferedPack`) and a KV cache that appends in place (`_growable_cache`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.compat import cache_kwargs, output_cache
from fastserve_cli.serve.backend_base import IN_PACK, Backend, PackedBatch, read_config
from fastserve_cli.serve.mixed_forward import chunk_mask, decode_mask, mixed_forward, supports_mixed_forward


@dataclass
class BufferedPack(PackedBatch):
    """A pack whose rows and columns are a window of larger buffers: rows [0, n) of `rows_cap`, columns
    [start, end) of `cols_cap` (free columns on both sides). `layers` and `mask` are views of the window."""

    kbufs: list[Any] = None
    vbufs: list[Any] = None
    maskbuf: Any = None
    start: int = 0
    end: int = 0

    def refresh(self) -> None:
        n = len(self.rows)
        self.layers = [
            (k[:n, :, self.start : self.end], v[:n, :, self.start : self.end]) for k, v in zip(self.kbufs, self.vbufs)
        ]
        self.mask = self.maskbuf[:n, self.start : self.end]


class TorchBackend(Backend):
    """A transformers model (fp32/bf16, or an optimize int8 variant via quantization.load_causal_lm)."""

    name = "torch"

    def __init__(
        self, model_dir: Path, device: str | None = None, fast_kernels: bool = True, dtype: str = "fp32"
    ) -> None:
        import torch

        from fastserve_cli.models.precision import resolve_dtype

        super().__init__(model_dir, read_config(model_dir))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        if dtype != "fp32" and self.config.get("quantization_config"):
            raise UserError(
                f"serve.dtype {dtype}: {self.model_dir} is a quantized variant (it picks its own compute "
                "precision); use dtype fp32 or serve the unquantized model"
            )
        self.model = _load_torch_model(self.model_dir, self.device, self.dtype)
        self.fast_kernels = 0
        if fast_kernels and self.device == "cpu":  # oneDNN-packed Linear layers, fp32 and (native) bf16
            from fastserve_cli.models.kernels import (
                decode_attention,
                fuse_activations,
                fuse_linear_gelu,
                onednn_linears,
            )

            self.fast_kernels = onednn_linears(self.model) + fuse_activations(self.model) + decode_attention(self.model)
            self.fast_kernels += fuse_linear_gelu(self.model)
        self._growing = None  # the lone request of the prefill in progress (see prefill_batch)
        self.mixed = supports_mixed_forward(self.model)  # decode rows + a prefill chunk in one forward (`step`)
        self._mixed_decode = self._mixed_logits = None  # the decode part of the `step` in progress
        self.mixed_steps = 0  # iterations whose decode and prefill ran as one forward
        param = next(self.model.parameters())
        self.kv_dtype_bytes = 2 if param.dtype in (torch.float16, torch.bfloat16) else 4

    def _new_pack(self, rows: int, width: int, dtype) -> PackedBatch:
        """Buffers with spare rows (up to the engine's batch size) and free columns on both sides, so the
        pack absorbs joins, leaves and longer newcomers without a rebuild (`_grow_rows`, `_widen`).

        Uninitialized: `_repack` and `_write_row` write the rows they use, pads included, and the cache
        appends a column before the attention reads it (zero-filling was 11% of the engine's time)."""
        import torch

        rows_cap = max(rows, min(self.max_rows or rows + 2, rows + max(2, rows // 2)))
        left, right = _headroom(width), _headroom(width)
        shape = (rows_cap, self.num_kv_heads, left + width + right, self.head_dim)
        pack = BufferedPack(
            [None] * rows,
            [],
            [0] * rows,
            None,
            kbufs=[torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)],
            vbufs=[torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)],
            maskbuf=torch.zeros(rows_cap, shape[2], dtype=torch.long, device=self.device),
            start=left,
            end=left + width,
        )
        pack.refresh()
        return pack

    def _set_rows(self, pack: PackedBatch, n: int) -> None:
        pack.refresh()

    def _grow_rows(self, pack: PackedBatch, n: int) -> bool:
        if n > pack.kbufs[0].shape[0]:
            return False
        pack.rows += [None] * (n - len(pack.rows))
        pack.pads += [0] * (n - len(pack.pads))
        pack.refresh()
        return True

    def _widen(self, pack: PackedBatch, width: int) -> bool:
        """Open `width - pack.width` free columns on the left; they are padding for the rows already there."""
        import torch

        extra = width - pack.width
        if extra > pack.start:
            return False
        n, new_start = len(pack.rows), pack.start - extra
        with torch.inference_mode():
            for k, v in zip(pack.kbufs, pack.vbufs):
                k[:n, :, new_start : pack.start] = 0
                v[:n, :, new_start : pack.start] = 0
            pack.maskbuf[:n, new_start : pack.start] = 0
        pack.start = new_start
        pack.pads = [p + extra for p in pack.pads]
        pack.refresh()
        return True

    def _trim(self, pack: PackedBatch, columns: int) -> None:
        if columns > 0:
            pack.start += columns
            pack.pads = [p - columns for p in pack.pads]
            pack.refresh()

    def _decode_forward(self, pack: PackedBatch, ids, positions):
        """The cache appends in place into the buffers' next free column (rebuilt when there is none)."""
        pack, cache, mask = self._decode_cache(pack)
        if self.mixed:  # the same lean layer loop as a mixed step, without transformers' per-call wrapping
            (logits,) = mixed_forward(self.model, [(ids, positions, cache, decode_mask(mask))])
        else:
            logits = self._call(ids, mask, positions, cache).logits[:, -1, :].float()
        pack.end += 1
        pack.refresh()
        return logits

    def _decode_cache(self, pack: PackedBatch):
        """-> (the pack, rebuilt when its buffers have no free column; a cache over its rows that appends into
        that column; the rows' attention mask including it)."""
        if pack.end >= pack.kbufs[0].shape[2]:
            self._repack(list(pack.rows))
            pack = self.packed
        n = len(pack.rows)
        pack.maskbuf[:n, pack.end] = 1
        mask = pack.maskbuf[:n, pack.start : pack.end + 1]
        cache = _growable_cache(
            buffers=[(k[:n, :, pack.start :], v[:n, :, pack.start :]) for k, v in zip(pack.kbufs, pack.vbufs)],
            length=pack.end - pack.start,
        )
        return pack, cache, mask

    def step(self, decodes, prefills, counts):
        """With decodes and one request's prefill (chunked prefill's iteration), one forward for both
        (`mixed_forward`: the weights are read once); otherwise the base class's two calls."""
        if not (self.mixed and decodes and len(prefills) == 1 and prefills[0].kv is not IN_PACK):
            return super().step(decodes, prefills, counts)
        pack, ids, positions = self._decode_inputs(decodes)
        pack, cache, mask = self._decode_cache(pack)
        self._mixed_decode = (ids, positions, cache, decode_mask(mask))
        try:
            prefilled = self.prefill_batch(prefills, counts)  # its forward runs the decode rows too
            decoded = self._mixed_logits
        finally:
            self._mixed_decode = self._mixed_logits = None
        pack.end += 1
        pack.refresh()
        self.mixed_steps += 1
        return self._decode_outputs(decodes, decoded), prefilled

    def _call(self, input_ids, attention_mask, position_ids, cache):
        """One cached model call that keeps only the last position's logits (decode steps and prefills)."""
        import torch

        with torch.inference_mode():
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(self.model, cache),
            )

    def prompt_logits(self, ids: list[int]):
        import torch

        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(ids), device=self.device).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=positions, use_cache=False)
        return out.logits[0].float()

    def prefill_batch(self, reqs, counts=None):
        """As the base class; a lone request's prefill keeps its KV in growable buffers, and its next chunk
        appends into them instead of copying its whole past into a fresh cache (which made every chunk of a
        long prompt cost O(past): 2,000 tokens in chunks of 16 took 4.7x the whole prefill)."""
        self._growing = reqs[0] if len(reqs) == 1 else None
        try:
            return super().prefill_batch(reqs, counts)
        finally:
            self._growing = None

    def forward(self, input_ids, attention_mask, position_ids, past):
        """A prefill (past None) or a call over `past` tensors copied into a fresh cache, or appended in place
        to the buffers they are views of when they are a lone request's own (see `prefill_batch`)."""

        req = self._growing
        if req is None:
            cache = _growable_cache(past)
        else:
            # Only the exact tensor this request's previous chunk produced, still held by that request, is
            # appended to in place: views of it handed to anyone else end before the appended positions.
            entry = getattr(past[0][0], _TAIL, None) if past is not None else None
            if entry is not None and entry[0] == req.seq:
                cache = _growable_cache(buffers=entry[1], length=int(past[0][0].shape[-2]))
            else:
                # Room for the whole prompt at once: growing the buffers chunk by chunk copied the past each
                # time (about ten times over a 2,000-token prompt: the P99 of a chunked prefill's iterations).
                cache = _growable_cache(past, layers=self.num_layers, reserve=req.total_len + _headroom(0))
        if self._mixed_decode is None:
            out = self._call(input_ids, attention_mask, position_ids, cache)
            logits, layers = out.logits[:, -1, :].float(), output_cache(out).layers
        else:  # `step`: this lone prefill's chunk and the decode rows in one forward
            mask = chunk_mask(0 if past is None else int(past[0][0].shape[-2]), input_ids.shape[1], self.device)
            self._mixed_logits, logits = mixed_forward(
                self.model, [self._mixed_decode, (input_ids, position_ids, cache, mask)]
            )
            layers = cache.layers
        present = [(layer.keys, layer.values) for layer in layers]
        if req is not None:  # the buffers live as long as this tensor: until the request's KV is replaced
            setattr(present[0][0], _TAIL, (req.seq, [(layer._kbuf, layer._vbuf) for layer in cache.layers]))
        return logits, present


_TAIL = "_fastserve_growable"  # attribute on a lone prefill's first key tensor: (request seq, its layers' buffers)


def _headroom(length: int) -> int:
    return max(32, length // 2)


def _growable_cache(past=None, buffers=None, length: int = 0, layers: int = 0, reserve: int = 0):
    """A transformers DynamicCache whose layers append into preallocated buffers (amortized O(1) per token).

    Built from `past` tensors (copied into new buffers), adopting `buffers` whose first `length` positions
    hold the cache already, or empty with `layers` growable layers; a plain DynamicCache when none is given.
    New buffers hold at least `reserve` positions.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    if past is None and buffers is None and not layers:
        return cache
    layer_class = _growable_layer_class()
    count = len(past) if past is not None else len(buffers) if buffers is not None else layers
    cache.layers = [layer_class() for _ in range(count)]
    for layer in cache.layers:
        layer.reserve = reserve
    if buffers is not None:
        for layer, (kbuf, vbuf) in zip(cache.layers, buffers):
            layer.adopt(kbuf, vbuf, length)
    elif past is not None:
        for layer, (k, v) in zip(cache.layers, past):
            kbuf, vbuf = _room_behind(k), _room_behind(v)
            if kbuf is not None and vbuf is not None:
                layer.adopt(kbuf, vbuf, k.shape[-2])  # a prefix-cache hit's buffer: append in place
            else:
                layer.update(k, v)
    return cache


def _room_behind(t):
    """The buffer `t` is the leading [..., :n, :] slice of, when it has room past n (else None)."""
    base = t._base
    if base is None or base.dim() != 4 or base.shape[-2] <= t.shape[-2] or t.data_ptr() != base.data_ptr():
        return None
    if base.shape[:2] != t.shape[:2] or base.shape[3] != t.shape[3] or t.stride() != base.stride():
        return None
    return base


_GROWABLE = []


def _growable_layer_class():
    """Defined on first use so importing this module does not import transformers."""
    if _GROWABLE:
        return _GROWABLE[0]
    import torch
    from transformers.cache_utils import DynamicLayer

    class GrowableLayer(DynamicLayer):
        def adopt(self, kbuf, vbuf, length: int) -> None:
            self.lazy_initialization(kbuf, vbuf)
            self._kbuf, self._vbuf, self._len = kbuf, vbuf, length
            self.keys, self.values = kbuf[..., :length, :], vbuf[..., :length, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._kbuf = self._vbuf = None
                self._len = 0
            new_len = self._len + key_states.shape[-2]
            if self._kbuf is None or new_len > self._kbuf.shape[-2]:
                shape = list(key_states.shape)
                shape[-2] = max(new_len + _headroom(new_len), getattr(self, "reserve", 0))
                kbuf = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
                vbuf = torch.empty(shape, dtype=value_states.dtype, device=value_states.device)
                if self._len:
                    kbuf[..., : self._len, :] = self._kbuf[..., : self._len, :]
                    vbuf[..., : self._len, :] = self._vbuf[..., : self._len, :]
                self._kbuf, self._vbuf = kbuf, vbuf
            self._kbuf[..., self._len : new_len, :] = key_states
            self._vbuf[..., self._len : new_len, :] = value_states
            self._len = new_len
            self.keys, self.values = self._kbuf[..., :new_len, :], self._vbuf[..., :new_len, :]
            return self.keys, self.values

    _GROWABLE.append(GrowableLayer)
    return GrowableLayer


def _load_torch_model(model_dir: Path, device: str, dtype=None):
    from fastserve_cli.models.loader import load_causal_lm

    return load_causal_lm(model_dir, device=device, dtype=dtype)
