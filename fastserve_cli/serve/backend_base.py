"""Model execution behind one small interface, so the engine (and a simulated executor) can swap it.

A backend runs two kinds of work for the engine:
- `prefill_batch(reqs, counts)`: for each request, the next `counts[i]` tokens of `req.all_ids` after the
  `req.kv_tokens` its KV already covers, all requests in ONE forward; each request's KV grows by its count
  and stays its own tensors (`req.kv`, a list of (key, value) [1, kv_heads, len, head_dim] per layer).
  "Prefill continues from `req.kv_tokens`" is the one primitive behind whole prefill (kv_tokens 0, count =
  everything), chunked prefill (a chunk per engine iteration) and a prefix-cache hit (`req.kv` arrives
  holding the first k prompt tokens, kv_tokens = k < len(all_ids)). The logits returned are those of each
  request's last computed position: the engine samples from them only after a request's last chunk.
  `prefill(req, num_tokens)` is the one-request form. Layout of the batched call, per row i with p_i past
  and n_i new tokens: past left-padded to P = max p_i, new tokens left-padded to N = max n_i, so every row's
  last token is the last position (one logits row each, which the ONNX graph's last-logits cut needs); the
  attention mask is 0 over both pads and the position ids run p_i .. p_i + n_i - 1 over the real tokens.
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
    def prefill(self, req: Request, num_tokens: int | None = None):
        """Compute the request's next `num_tokens` tokens (all the rest when None) after the `req.kv_tokens`
        its KV covers; returns the last position's logits [1, V]."""
        return self.prefill_batch([req], [num_tokens])

    def prefill_batch(self, reqs: list[Request], counts: list[int | None] | None = None):
        """One forward over the next `counts[i]` tokens of each request (None: the rest of its sequence),
        continuing from each request's KV (on the device, or none); -> logits [B, V] of each row's last token.

        Every request's KV grows by its count (`req.kv_tokens` too). Requests whose KV is in the decode pack
        get their own tensors first (a prefill never touches the pack's rows)."""
        import torch

        counts = [r.total_len - r.kv_tokens if c is None else c for r, c in zip(reqs, counts or [None] * len(reqs))]
        for r, n in zip(reqs, counts):
            if r.kv_location == "host" or not 0 < n <= r.total_len - r.kv_tokens:
                raise ValueError(f"{r.request_id}: cannot prefill {n} tokens after {r.kv_tokens} ({r.kv_location})")
            self.detach(r)
        pasts = [r.kv_tokens if r.kv_location == "device" else 0 for r in reqs]
        width, new = max(pasts), max(counts)
        ids = torch.zeros(len(reqs), new, dtype=torch.long)
        positions = torch.zeros(len(reqs), new, dtype=torch.long)
        mask = torch.zeros(len(reqs), width + new, dtype=torch.long)
        for i, (r, p, n) in enumerate(zip(reqs, pasts, counts)):
            ids[i, new - n :] = torch.tensor(r.all_ids[p : p + n], dtype=torch.long)
            positions[i, new - n :] = torch.arange(p, p + n)
            mask[i, width - p : width] = 1
            mask[i, width + new - n :] = 1
        past = self._padded_past(reqs, pasts, width) if width else None
        logits, present = self.forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), past)
        for i, (r, p, n) in enumerate(zip(reqs, pasts, counts)):
            r.kv = present if len(reqs) == 1 else _row_kv(present, i, width, p, new, n)
            r.kv_tokens, r.kv_location = p + n, "device"
        return logits

    def _padded_past(self, reqs: list[Request], pasts: list[int], width: int) -> list[tuple[Any, Any]]:
        """The requests' KV as one batch per layer, left-padded with zeros to `width` (pads must be finite)."""
        import torch

        if len(reqs) == 1:
            return reqs[0].kv
        first = next(r.kv for r, p in zip(reqs, pasts) if p)
        layers = []
        with torch.inference_mode():  # the caches come out of the model's inference-mode forward
            for layer, (k0, _) in enumerate(first):
                shape = (len(reqs), k0.shape[1], width, k0.shape[3])
                k_all = torch.zeros(shape, dtype=k0.dtype, device=k0.device)
                v_all = torch.zeros(shape, dtype=k0.dtype, device=k0.device)
                for i, (r, p) in enumerate(zip(reqs, pasts)):
                    if p:
                        k, v = r.kv[layer]
                        k_all[i, :, width - p :] = k[0]
                        v_all[i, :, width - p :] = v[0]
                layers.append((k_all, v_all))
        return layers

    def step(self, decodes: list[Request], prefills: list[Request], counts: list[int | None]):
        """An iteration's model work: one decode over `decodes` and one prefill over `prefills` (the next
        `counts[i]` tokens each) -> (decode logits [len(decodes), V] or None, prefill logits or None).
        Two calls here; the torch backend runs both in one forward where it can (serve/mixed_forward.py)."""
        decoded = self.decode(decodes) if decodes else None
        return decoded, self.prefill_batch(prefills, counts) if prefills else None

    def decode(self, reqs: list[Request]):
        """One token for every request in `reqs` (all prefilled, KV on the device) -> logits [B, V] in `reqs` order."""
        pack, ids, positions = self._decode_inputs(reqs)
        return self._decode_outputs(reqs, self._decode_forward(pack, ids, positions))

    def _decode_inputs(self, reqs: list[Request]):
        """The pack holding exactly `reqs`, and its rows' next input ids and positions [B, 1] (pack row order)."""
        import torch

        if self.packed is None or not self._update_pack(reqs):
            self._repack(reqs)
        pack = self.packed
        ids = torch.tensor([[r.next_input_id] for r in pack.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.kv_tokens] for r in pack.rows], dtype=torch.long, device=self.device)
        return pack, ids, positions

    def _decode_outputs(self, reqs: list[Request], logits):
        """After the decode forward: every row's KV grew by one; logits back in `reqs` order."""
        rows = self.packed.rows  # the forward ran in the pack's row order
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


def _row_kv(present: list[tuple[Any, Any]], i: int, width: int, past: int, new: int, count: int):
    """Row i's KV out of a batched prefill's output (past left-padded to `width`, new tokens to `new`): its
    own contiguous [1, heads, past + count, dim] tensors, so the batch's buffers are not kept alive."""
    import torch

    def cut(t):
        old, fresh = t[i : i + 1, :, width - past : width], t[i : i + 1, :, width + new - count :]
        return torch.cat([old, fresh], dim=2) if past else fresh.clone()

    with torch.inference_mode():
        return [(cut(k), cut(v)) for k, v in present]


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
