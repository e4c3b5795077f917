"""Model execution behind one small interface, so the engine (and a simulated executor) can swap it.

A backend runs two kinds of work for the engine:
- `prefill(req)`: the request's whole token sequence in one forward; its KV becomes the request's own
  tensors (`req.kv`, a list of (key, value) [1, kv_heads, len, head_dim] per layer).
- `decode(reqs)`: one token for each prefilled request in one batched forward.

Batching requests with different past lengths: the rows of a decode batch are packed into one left-padded
KV tensor per layer with an attention mask over the pads (`PackedBatch`). The pack outlives membership
changes, so steady-state decoding copies nothing beyond what the model's cache append does:
- a request that joins takes a leaving request's row, or a new row at the end, and only its own KV is
  copied in; a request that leaves without a replacement is filled by the last row (one row's copy);
- the torch backend keeps the pack in preallocated buffers with spare rows and free columns on both
  sides, so the batch can grow, take a newcomer longer than the pack, and drop columns that became
  padding for every row, all without copying the others (`BufferedPack`);
- the whole pack is rebuilt (one copy of the live KV: `repacks`) only when the buffers run out.
Requests whose KV sits in the pack have `req.kv is IN_PACK`; `detach(req)` gives them their own tensors back.

Subclasses implement `forward` (one model call on torch tensors) and say how many bytes a token of KV takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.compat import cache_kwargs, output_cache
from fastserve_cli.serve.request import Request

IN_PACK = "in-pack"  # req.kv marker: this request's KV is a row of the backend's PackedBatch


@dataclass
class PackedBatch:
    rows: list[Request]
    layers: list[tuple[Any, Any]]  # per layer (key, value): [B, kv_heads, width, head_dim]
    pads: list[int]  # left padding per row
    mask: Any  # [B, width] int64, 0 over pads

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def row_kv(self, i: int) -> list[tuple[Any, Any]]:
        """Views of row i without its padding."""
        p = self.pads[i]
        return [(k[i:i + 1, :, p:], v[i:i + 1, :, p:]) for k, v in self.layers]


class Backend:
    """Shared prefill/decode/packing logic; subclasses provide `forward` and the model facts."""

    name = "base"

    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.packed: PackedBatch | None = None
        self.repacks = 0  # whole-batch copies (the pack could not absorb a membership change)
        self.swaps = 0  # requests copied into a row of the live pack instead
        self.max_rows: int | None = None  # the engine's max batch size, when it says (sizes the torch pack)
        self.num_layers, self.num_kv_heads, self.head_dim = _kv_geometry(config)
        self.max_context = int(config.get("n_positions") or config.get("max_position_embeddings") or 2048)
        self.eos_token_ids = _eos_ids(self.model_dir, config)
        self.kv_dtype_bytes = 4
        self.device = "cpu"
        self.host_device = "cpu"

    # -- what subclasses implement ---------------------------------------------------------
    def forward(self, input_ids, attention_mask, position_ids, past: list[tuple[Any, Any]] | None):
        """One model call on torch tensors -> (last-position logits [B, V] float32, present KV per layer)."""
        raise NotImplementedError

    def prompt_logits(self, ids: list[int]):
        """Logits of every position of `ids` ([T, V] float32) from a forward of its own: no cache is kept and the
        decode pack is not touched (prompt scoring for `echo`; see scoring.py)."""
        raise NotImplementedError

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    # -- engine-facing operations ----------------------------------------------------------
    def prefill(self, req: Request):
        """Run the request's whole sequence (prompt + anything generated before a recompute)."""
        import torch

        ids = torch.tensor([req.all_ids], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
        logits, present = self.forward(ids, mask, positions, None)
        req.kv, req.kv_tokens, req.kv_location = present, ids.shape[1], "device"
        return logits

    def decode(self, reqs: list[Request]):
        """One token for every request in `reqs` (all prefilled, KV on the device) -> logits [B, V] in `reqs` order."""
        import torch

        if self.packed is None or not self._update_pack(reqs):
            self._repack(reqs)
        pack = self.packed
        rows = pack.rows  # the forward runs in the pack's row order
        ids = torch.tensor([[r.output_ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.kv_tokens] for r in rows], dtype=torch.long, device=self.device)
        logits = self._decode_forward(pack, ids, positions)
        for r in rows:
            r.kv_tokens += 1
        if not _same(rows, reqs):
            index = {id(r): i for i, r in enumerate(rows)}
            logits = logits[[index[id(r)] for r in reqs]]
        return logits

    def _decode_forward(self, pack: PackedBatch, ids, positions):
        """The batched decode call; the pack's KV and mask grow by one column."""
        import torch

        mask = torch.cat([pack.mask, torch.ones(len(pack.rows), 1, dtype=torch.long, device=self.device)], dim=1)
        logits, present = self.forward(ids, mask, positions, pack.layers)
        pack.layers, pack.mask = present, mask
        return logits

    def _update_pack(self, reqs: list[Request]) -> bool:
        """Make the live pack hold exactly `reqs` by moving single rows; False when it must be rebuilt.

        Joining requests take the rows of leaving ones (finished, preempted or released), then new rows
        at the end (`_grow_rows`); rows left without a replacement are filled from the end of the pack,
        so the rows stay contiguous. A newcomer longer than the pack needs `_widen`. Columns that became
        padding for every row are dropped (`_trim`). Every step copies only the rows that move.
        """
        pack = self.packed
        staying = {id(r) for r in pack.rows if r.kv is IN_PACK}
        joining = [r for r in reqs if id(r) not in staying]
        if any(r.kv is None or r.kv is IN_PACK or r.kv_location != "device" for r in joining):
            return False
        wanted = {id(r) for r in reqs}
        free = [i for i, r in enumerate(pack.rows) if id(r) not in wanted or r.kv is not IN_PACK]
        longest = max((r.kv_tokens for r in joining), default=0)
        grow = len(joining) - len(free)
        if longest > pack.width and not self._widen(pack, longest):
            return False
        if grow > 0 and not self._grow_rows(pack, len(pack.rows) + grow):
            return False
        for i in free:
            leaving = pack.rows[i]
            if leaving.kv is IN_PACK:  # preempted, still live: it keeps its cache as its own tensors
                leaving.kv = [(k.clone(), v.clone()) for k, v in pack.row_kv(i)]
        targets = free[:len(joining)] + list(range(len(pack.rows) - max(grow, 0), len(pack.rows)))
        for i, req in zip(targets, joining):
            self._write_row(pack, i, req)
        self._drop_rows(pack, sorted(free[len(joining):]))
        self._trim(pack, min(pack.pads))
        self.swaps += len(joining)
        return True

    def _write_row(self, pack: PackedBatch, i: int, req: Request, kv: list[tuple[Any, Any]] | None = None) -> None:
        """Copy `req`'s KV (its own tensors, or `kv`) into row i, left-padded with zeros (pads must be finite:
        masked scores times NaN would still be NaN)."""
        import torch

        pad = pack.width - req.kv_tokens
        with torch.inference_mode():  # the pack's tensors come out of the model's inference-mode forward
            for (k_all, v_all), (k, v) in zip(pack.layers, kv or req.kv):
                k_all[i, :, pad:] = k[0]
                v_all[i, :, pad:] = v[0]
                k_all[i, :, :pad] = 0
                v_all[i, :, :pad] = 0
            pack.mask[i, :pad] = 0
            pack.mask[i, pad:] = 1
        pack.pads[i], pack.rows[i] = pad, req
        req.kv = IN_PACK

    def _drop_rows(self, pack: PackedBatch, holes: list[int]) -> None:
        """Remove rows `holes` (ascending), filling each from the end of the pack: one row copied per hole."""
        import torch

        n = len(pack.rows)
        holes = list(holes)
        with torch.inference_mode():
            while holes:
                last = n - 1
                if holes[-1] == last:
                    holes.pop()
                else:
                    hole = holes.pop(0)
                    for k_all, v_all in pack.layers:
                        k_all[hole] = k_all[last]
                        v_all[hole] = v_all[last]
                    pack.mask[hole] = pack.mask[last]
                    pack.pads[hole], pack.rows[hole] = pack.pads[last], pack.rows[last]
                n -= 1
        if n < len(pack.rows):
            del pack.rows[n:], pack.pads[n:]
            self._set_rows(pack, n)

    def _set_rows(self, pack: PackedBatch, n: int) -> None:
        """The pack keeps its first n rows (views, no copy)."""
        pack.layers = [(k[:n], v[:n]) for k, v in pack.layers]
        pack.mask = pack.mask[:n]

    def _grow_rows(self, pack: PackedBatch, n: int) -> bool:
        """Room for n rows without a rebuild (the new rows are written next); False when there is none."""
        return False

    def _widen(self, pack: PackedBatch, width: int) -> bool:
        """Room for `width` columns on the left without a rebuild; False when there is none."""
        return False

    def _trim(self, pack: PackedBatch, columns: int) -> None:
        """Drop `columns` leading columns that are padding in every row (views, no copy)."""
        if columns <= 0:
            return
        pack.layers = [(k[:, :, columns:], v[:, :, columns:]) for k, v in pack.layers]
        pack.mask = pack.mask[:, columns:]
        pack.pads = [p - columns for p in pack.pads]

    def detach(self, req: Request) -> None:
        """Give `req` its own KV tensors if they live in the pack (before offload, or when it leaves)."""
        pack = self.packed
        if pack is None or req.kv is not IN_PACK:
            return
        i = next(i for i, r in enumerate(pack.rows) if r is req)
        req.kv = [(k.clone(), v.clone()) for k, v in pack.row_kv(i)]

    def release(self, req: Request) -> None:
        """Forget the request's KV (finished, cancelled or preempted by recompute).

        A released row stays in the pack until the next decode drops it or gives it to a newcomer.
        """
        req.kv, req.kv_tokens, req.kv_location = None, 0, "none"

    def to_host(self, req: Request) -> None:
        self.detach(req)
        req.kv = [(k.to(self.host_device, copy=True), v.to(self.host_device, copy=True)) for k, v in req.kv]
        req.kv_location = "host"

    def to_device(self, req: Request) -> None:
        req.kv = [(k.to(self.device), v.to(self.device)) for k, v in req.kv]
        req.kv_location = "device"

    def _repack(self, reqs: list[Request]) -> None:
        """Build a new pack for `reqs` (one copy of their KV); rows leaving the old pack get their own tensors first."""
        self.repacks += 1
        old = self.packed
        keep = {id(r) for r in reqs}
        sources = {}
        if old is not None:
            for i, r in enumerate(old.rows):
                if r.kv is not IN_PACK:
                    continue
                if id(r) in keep:
                    sources[id(r)] = old.row_kv(i)
                else:
                    r.kv = [(k.clone(), v.clone()) for k, v in old.row_kv(i)]
        width = max(r.kv_tokens for r in reqs)
        first_k = (sources.get(id(reqs[0])) or reqs[0].kv)[0][0]
        pack = self._new_pack(len(reqs), width, first_k.dtype)
        for row, r in enumerate(reqs):
            self._write_row(pack, row, r, sources.get(id(r)))
        self.packed = pack

    def _new_pack(self, rows: int, width: int, dtype) -> PackedBatch:
        """An empty pack of `rows` x `width` (uninitialized: `_repack` writes every row, pads included)."""
        import torch

        shape = (rows, self.num_kv_heads, width, self.head_dim)
        layers = [(torch.empty(shape, dtype=dtype, device=self.device), torch.empty(shape, dtype=dtype, device=self.device))
                  for _ in range(self.num_layers)]
        mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        return PackedBatch([None] * rows, layers, [0] * rows, mask)


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
        self.layers = [(k[:n, :, self.start:self.end], v[:n, :, self.start:self.end])
                       for k, v in zip(self.kbufs, self.vbufs)]
        self.mask = self.maskbuf[:n, self.start:self.end]


def _same(a: list[Request], b: list[Request]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _kv_geometry(config: dict[str, Any]) -> tuple[int, int, int]:
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    if not (layers and heads and hidden):
        raise UserError("config.json: cannot tell the number of layers/heads/hidden size; serve a transformers causal LM")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def _eos_ids(model_dir: Path, config: dict[str, Any]) -> set[int]:
    """Every token that ends a sequence (EOS ids of both configs + the chat template's end of turn)."""
    from fastserve_cli.models.eos import model_dir_stop_ids

    return model_dir_stop_ids(model_dir, config)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json; pass a run directory, a model directory or an onnx directory")
    return json.loads(path.read_text(encoding="utf-8"))


class TorchBackend(Backend):
    """A transformers model (fp32/bf16, or an optimize int8 variant via quantization.load_causal_lm)."""

    name = "torch"

    def __init__(self, model_dir: Path, device: str | None = None, fast_kernels: bool = True, dtype: str = "fp32") -> None:
        import torch

        from fastserve_cli.models.precision import resolve_dtype

        super().__init__(model_dir, read_config(model_dir))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        if dtype != "fp32" and self.config.get("quantization_config"):
            raise UserError(f"serve.dtype {dtype}: {self.model_dir} is a quantized variant (it picks its own compute "
                            "precision); use dtype fp32 or serve the unquantized model")
        self.model = _load_torch_model(self.model_dir, self.device, self.dtype)
        self.fast_kernels = 0
        if fast_kernels and self.device == "cpu":  # oneDNN-packed Linear layers, fp32 and (native) bf16
            from fastserve_cli.models.kernels import fuse_activations, onednn_linears

            self.fast_kernels = onednn_linears(self.model) + fuse_activations(self.model)
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
        pack = BufferedPack([None] * rows, [], [0] * rows, None,
                            kbufs=[torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)],
                            vbufs=[torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)],
                            maskbuf=torch.zeros(rows_cap, shape[2], dtype=torch.long, device=self.device),
                            start=left, end=left + width)
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
                k[:n, :, new_start:pack.start] = 0
                v[:n, :, new_start:pack.start] = 0
            pack.maskbuf[:n, new_start:pack.start] = 0
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
        import torch

        if pack.end >= pack.kbufs[0].shape[2]:
            self._repack(list(pack.rows))
            pack = self.packed
        n = len(pack.rows)
        pack.maskbuf[:n, pack.end] = 1
        mask = pack.maskbuf[:n, pack.start:pack.end + 1]
        cache = _growable_cache(buffers=[(k[:n, :, pack.start:], v[:n, :, pack.start:])
                                         for k, v in zip(pack.kbufs, pack.vbufs)], length=pack.end - pack.start)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **cache_kwargs(self.model, cache))
        pack.end += 1
        pack.refresh()
        return out.logits[:, -1, :].float()

    def prompt_logits(self, ids: list[int]):
        import torch

        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(ids), device=self.device).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=positions, use_cache=False)
        return out.logits[0].float()

    def forward(self, input_ids, attention_mask, position_ids, past):
        """A prefill (past None) or a call over `past` tensors copied into a fresh cache."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, _growable_cache(past)))
        return out.logits[:, -1, :].float(), [(layer.keys, layer.values) for layer in output_cache(out).layers]


def _headroom(length: int) -> int:
    return max(32, length // 2)


def _growable_cache(past=None, buffers=None, length: int = 0):
    """A transformers DynamicCache whose layers append into preallocated buffers (amortized O(1) per token).

    Built from `past` tensors (copied into new buffers) or adopting `buffers` whose first `length` positions
    hold the cache already.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    if past is None and buffers is None:
        return cache
    layer_class = _growable_layer_class()
    cache.layers = [layer_class() for _ in (past if past is not None else buffers)]
    if buffers is not None:
        for layer, (kbuf, vbuf) in zip(cache.layers, buffers):
            layer.adopt(kbuf, vbuf, length)
    else:
        for layer, (k, v) in zip(cache.layers, past):
            layer.update(k, v)
    return cache


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
                shape[-2] = new_len + _headroom(new_len)
                kbuf = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
                vbuf = torch.empty(shape, dtype=value_states.dtype, device=value_states.device)
                if self._len:
                    kbuf[..., :self._len, :] = self._kbuf[..., :self._len, :]
                    vbuf[..., :self._len, :] = self._vbuf[..., :self._len, :]
                self._kbuf, self._vbuf = kbuf, vbuf
            self._kbuf[..., self._len:new_len, :] = key_states
            self._vbuf[..., self._len:new_len, :] = value_states
            self._len = new_len
            self.keys, self.values = self._kbuf[..., :new_len, :], self._vbuf[..., :new_len, :]
            return self.keys, self.values

    _GROWABLE.append(GrowableLayer)
    return GrowableLayer


def _load_torch_model(model_dir: Path, device: str, dtype=None):
    from fastserve_cli.models.loader import load_causal_lm

    return load_causal_lm(model_dir, device=device, dtype=dtype)


class OnnxBackend(Backend):
    """onnxruntime over the export stage's graph (optimum names; CUDA EP when present, CPU otherwise)."""

    name = "onnx"

    def __init__(self, onnx_dir: Path, threads: int | None = None) -> None:
        import numpy as np

        from fastserve_cli.models.onnx import OnnxCausalLM

        super().__init__(onnx_dir, read_config(onnx_dir))
        self.session = OnnxCausalLM(onnx_dir, threads=threads, last_logits_only=True, spin=False)
        self.num_layers = self.session.num_layers
        self.num_kv_heads, self.head_dim = self.session.num_kv_heads, self.session.head_dim
        self.kv_dtype_bytes = np.dtype(self.session.kv_dtype).itemsize
        self.threads = threads
        self._scoring_session = None

    def prompt_logits(self, ids: list[int]):
        """The serving session keeps only the last position's logits (a graph cut, see OnnxCausalLM); scoring
        opens a second session on the full graph the first time a client asks for prompt logprobs."""
        import numpy as np
        import torch

        from fastserve_cli.models.onnx import OnnxCausalLM

        session = self.session
        if session.last_logits_only:
            if self._scoring_session is None:
                self._scoring_session = OnnxCausalLM(self.model_dir, threads=self.threads, spin=False)
            session = self._scoring_session
        x = np.asarray([ids], dtype=np.int64)
        logits, _ = session.step(x, np.ones_like(x), np.arange(len(ids), dtype=np.int64)[None, :])
        return torch.from_numpy(np.ascontiguousarray(logits[0], dtype=np.float32))

    def forward(self, input_ids, attention_mask, position_ids, past):
        import numpy as np
        import torch

        flat = None
        if past is not None:
            flat = [np.ascontiguousarray(t.numpy()) for kv in past for t in kv]
        logits, present = self.session.step(input_ids.numpy(), attention_mask.numpy(), position_ids.numpy(), flat)
        layers = [(torch.from_numpy(present[2 * i]), torch.from_numpy(present[2 * i + 1])) for i in range(self.num_layers)]
        return torch.from_numpy(np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)), layers


def load_backend(kind: str, model_dir: Path, threads: int | None = None, fast_kernels: bool = True,
                 dtype: str = "fp32") -> Backend:
    if kind == "torch":
        return TorchBackend(model_dir, fast_kernels=fast_kernels, dtype=dtype)
    if dtype != "fp32":
        raise UserError(f"serve.dtype {dtype}: only the torch backend computes in bf16; the onnx graph keeps the "
                        "precision it was exported in (use dtype fp32)")
    if kind == "onnx":
        return OnnxBackend(model_dir, threads=threads)
    raise UserError(f"--backend {kind}: unknown backend; choose torch or onnx")
