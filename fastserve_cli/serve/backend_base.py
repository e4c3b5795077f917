"""Model execution behind one small interface, so the engine (and a simulated executor) can swap it.

A backend runs two kinds of work for the engine:
- `prefill(req)`: the request's whole token sequence in one forward (or the part after a cached prefix it
  starts with); its KV becomes the request's own tensors (`req.kv`, a list of (key, value)
  [1, kv_heads, len, head_dim] per layer).
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
        return [(k[i : i + 1, :, p:], v[i : i + 1, :, p:]) for k, v in self.layers]


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
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(config)
        self.max_context = int(config.get("n_positions") or config.get("max_position_embeddings") or 2048)
        self.eos_token_ids = eos_ids(self.model_dir, config)
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
        """Run the request's sequence (prompt + anything generated before a recompute) in one forward.

        A request may start with KV for its first `req.kv_tokens` tokens (its own tensors on the device: a
        prefix-cache hit); the forward then computes only the rest, with that KV as the past."""
        import torch

        done = req.kv_tokens if req.kv is not None else 0
        total = req.total_len
        ids = torch.tensor([req.all_ids[done:]], dtype=torch.long, device=self.device)
        mask = torch.ones(1, total, dtype=torch.long, device=self.device)
        positions = torch.arange(done, total, device=self.device).unsqueeze(0)
        logits, present = self.forward(ids, mask, positions, req.kv if done else None)
        req.kv, req.kv_tokens, req.kv_location = present, total, "device"
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
        if not same_rows(rows, reqs):
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
        targets = free[: len(joining)] + list(range(len(pack.rows) - max(grow, 0), len(pack.rows)))
        for i, req in zip(targets, joining):
            self._write_row(pack, i, req)
        self._drop_rows(pack, sorted(free[len(joining) :]))
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
        layers = [
            (torch.empty(shape, dtype=dtype, device=self.device), torch.empty(shape, dtype=dtype, device=self.device))
            for _ in range(self.num_layers)
        ]
        mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        return PackedBatch([None] * rows, layers, [0] * rows, mask)


def same_rows(a: list[Request], b: list[Request]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def kv_geometry(config: dict[str, Any]) -> tuple[int, int, int]:
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    if not (layers and heads and hidden):
        raise UserError(
            "config.json: cannot tell the number of layers/heads/hidden size; serve a transformers causal LM"
        )
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def eos_ids(model_dir: Path, config: dict[str, Any]) -> set[int]:
    """Every token that ends a sequence (EOS ids of both configs + the chat template's end of turn)."""
    from fastserve_cli.models.eos import model_dir_stop_ids

    return model_dir_stop_ids(model_dir, config)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json; pass a run directory, a model directory or an onnx directory")
    return json.loads(path.read_text(encoding="utf-8"))
