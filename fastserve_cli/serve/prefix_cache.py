"""Automatic prefix caching: the KV of full token blocks, reused by later requests whose prompts start alike.

What vLLM's automatic prefix caching and SGLang's RadixAttention give their users, on our per-request KV:
- A block is `block_size` tokens. Its key chains the parent block's key with its own tokens, so a key names
  the whole prefix up to the block's end (a block is found only under the same parent; the tokens are
  compared on a hit, so a hash collision is a miss, never wrong KV).
- After a prefill, the full blocks of what was prefilled are stored (a copy of their KV, [layers, kv_heads,
  block, head_dim] per key/value) while the KV budget has room.
- A request about to be prefilled matches the longest run of cached blocks of its tokens, at most up to its
  next-to-last token (one token must be computed to get logits). Its prefill then starts with those k tokens
  as `req.kv` (`req.kv_tokens = k`) and runs one forward over the rest with them as the past.
- The cache lives inside the KV budget (`KVCacheManager` counts its bytes with the live requests'). A request
  holds references on its matched blocks from the moment the KV manager schedules it until its prefill has
  copied them; a referenced block is never evicted. Unreferenced blocks go least recently used first, leaves
  before their parents (a parent's key is part of every descendant's), whenever the KV manager needs room,
  before any live request is offloaded or preempted.

Our caches are contiguous per request (the decode pack holds copies), so a hit copies the cached KV into the
request instead of sharing pages as vLLM does: it saves the prefill's compute, not memory.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from fastserve_cli.serve.request import Request


@dataclass(eq=False)
class Block:
    key: int
    parent: Block | None
    tokens: tuple[int, ...]
    keys: Any  # [layers, kv_heads, block_size, head_dim] on the backend's device
    values: Any
    refs: int = 0  # requests about to read this block
    children: int = 0  # cached blocks whose parent this is
    last_used: int = 0


@dataclass
class PrefixCacheStats:
    """Running totals (vLLM's prefix_cache_queries / prefix_cache_hits are tokens too)."""

    queries: int = 0  # tokens of the prefills that looked the cache up
    hits: int = 0  # of those, tokens whose KV came from the cache
    inserted_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class PrefixCache:
    """Blocks by chain key, with reference counts and an LRU of the evictable ones (see the module doc)."""

    block_size: int
    block_bytes: int  # KV bytes of one block
    capacity: int  # bytes the cache may hold at most (it only ever uses room the live requests leave free)
    budget: int = 0  # the whole KV budget it lives in (for the usage gauge)
    blocks: dict[int, Block] = field(default_factory=dict)
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _held: dict[int, list[Block]] = field(default_factory=dict)  # id(request) -> the blocks it holds
    _heap: list[tuple[int, int, Block]] = field(default_factory=list)  # (last_used, tie, block), lazily pruned
    _tick: Any = field(default_factory=itertools.count)
    _tie: Any = field(default_factory=itertools.count)
    _referenced: int = 0  # blocks with refs > 0

    @property
    def bytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    @property
    def held_bytes(self) -> int:
        return self._referenced * self.block_bytes

    @property
    def evictable_bytes(self) -> int:
        """Every unreferenced block can go (a held chain runs from the root, so no free block is below a held
        one)."""
        return self.bytes - self.held_bytes

    # -- lookup -------------------------------------------------------------------------------------------
    def match(self, ids: list[int]) -> list[Block]:
        """The cached blocks that start `ids`, leaving at least its last token uncovered."""
        found: list[Block] = []
        parent = None
        for start in range(0, len(ids) - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(ids[start : start + self.block_size])
            block = self.blocks.get(_key(parent, tokens))
            if block is None or block.parent is not parent or block.tokens != tokens:
                break
            found.append(block)
            parent = block
        return found

    def acquire(self, req: Request) -> int:
        """Reference the blocks `req`'s next prefill will read (no-op if it holds some); tokens they cover."""
        if id(req) not in self._held:
            blocks = self.match(req.all_ids)
            for block in blocks:
                block.refs += 1
                self._referenced += block.refs == 1
            self._touch(blocks)
            self._held[id(req)] = blocks
        return len(self._held[id(req)]) * self.block_size

    def release(self, req: Request) -> None:
        """Drop `req`'s references (its prefill copied the blocks, or it left before running)."""
        for block in self._held.pop(id(req), []):
            block.refs -= 1
            self._referenced -= block.refs == 0
            self._push_if_evictable(block)

    def attach(self, req: Request) -> None:
        """Start `req`'s prefill from its cached prefix: `req.kv` gets a copy of the blocks' KV (k tokens)."""
        self.acquire(req)
        blocks = self._held[id(req)]
        self.stats.queries += req.total_len
        if not blocks:
            return
        k = len(blocks) * self.block_size
        self.stats.hits += k
        layers = range(blocks[0].keys.shape[0])
        total = req.total_len
        req.kv = [(_gather(blocks, "keys", i, k, total), _gather(blocks, "values", i, k, total)) for i in layers]
        req.kv_tokens, req.kv_location = k, "device"

    # -- insertion ----------------------------------------------------------------------------------------
    def insert(self, req: Request, free_bytes: int) -> None:
        """Store the full blocks of `req`'s fresh KV (its own tensors, after a prefill) that are not cached yet,
        using at most `free_bytes` beyond what evicting unreferenced blocks gives back; then release `req`."""
        ids = req.all_ids[: req.kv_tokens]
        chain: list[Block] = []
        parent = None
        n_full = len(ids) // self.block_size
        for j in range(n_full):
            tokens = tuple(ids[j * self.block_size : (j + 1) * self.block_size])
            key = _key(parent, tokens)
            block = self.blocks.get(key)
            if block is None:
                break
            if block.parent is not parent or block.tokens != tokens:
                n_full = j  # a colliding key: leave the rest uncached
                break
            chain.append(block)
            parent = block
        new = range(len(chain), n_full)
        if new and req.kv is not None and not isinstance(req.kv, str):
            room = min(free_bytes, self.capacity - self.bytes)
            if room < len(new) * self.block_bytes:
                room += self.evict(len(new) * self.block_bytes - room, keep=set(map(id, chain)))
            count = min(len(new), max(0, room) // self.block_bytes)
            chain += self._store(req, ids, parent, new.start, count)
        self._touch(chain)
        self.release(req)

    def _store(self, req: Request, ids: list[int], parent: Block | None, first: int, count: int) -> list[Block]:
        import torch

        if count <= 0:
            return []
        b = self.block_size
        stored = []
        with torch.inference_mode():
            for j in range(first, first + count):
                span = slice(j * b, (j + 1) * b)
                keys = torch.stack([k[0, :, span] for k, _ in req.kv])  # one copy, a block's own memory
                values = torch.stack([v[0, :, span] for _, v in req.kv])
                tokens = tuple(ids[span])
                block = Block(_key(parent, tokens), parent, tokens, keys, values)
                self.blocks[block.key] = block
                if parent is not None:
                    parent.children += 1
                stored.append(block)
                parent = block
        self.stats.inserted_blocks += count
        return stored

    # -- eviction -----------------------------------------------------------------------------------------
    def evict(self, need_bytes: int, keep: set[int] = frozenset()) -> int:
        """Drop unreferenced blocks, least recently used leaves first, until `need_bytes` are free; bytes freed."""
        freed = 0
        skipped = []
        while freed < need_bytes and self._heap:
            stamp, tie, block = heapq.heappop(self._heap)
            if not self._evictable(block) or stamp != block.last_used:
                continue
            if id(block) in keep:
                skipped.append((stamp, tie, block))
                continue
            del self.blocks[block.key]
            self.stats.evicted_blocks += 1
            freed += self.block_bytes
            if block.parent is not None:
                block.parent.children -= 1
                self._push_if_evictable(block.parent)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return freed

    def clear(self) -> None:
        """Evict every unreferenced block."""
        self.evict(self.bytes)

    def _evictable(self, block: Block) -> bool:
        return block.refs == 0 and block.children == 0 and self.blocks.get(block.key) is block

    def _push_if_evictable(self, block: Block) -> None:
        if self._evictable(block):
            heapq.heappush(self._heap, (block.last_used, next(self._tie), block))

    def _touch(self, chain: list[Block]) -> None:
        """Mark a chain as just used (one stamp for all of it: leaves still go before their parents)."""
        stamp = next(self._tick)
        for block in chain:
            block.last_used = stamp
            self._push_if_evictable(block)
        if len(self._heap) > 4 * len(self.blocks) + 64:  # stale entries: rebuild from the evictable blocks
            self._heap = [(b.last_used, next(self._tie), b) for b in self.blocks.values() if self._evictable(b)]
            heapq.heapify(self._heap)


def make_prefix_cache(backend, device_budget: int, block_size: int = 16, fraction: float = 1.0) -> PrefixCache:
    """A cache of `block_size`-token blocks that may hold up to `fraction` of the KV budget."""
    return PrefixCache(
        block_size=block_size,
        block_bytes=block_size * backend.kv_bytes_per_token,
        capacity=int(fraction * device_budget),
        budget=device_budget,
    )


def _gather(blocks: list[Block], which: str, layer: int, k: int, total: int):
    """One layer's cached keys or values of `blocks` as a [1, kv_heads, k, head_dim] view of a buffer with room for
    `total` tokens: the torch backend's cache appends the prefill's new tokens in place (no second copy)."""
    import torch

    first = getattr(blocks[0], which)
    _, heads, _, dim = first.shape
    with torch.inference_mode():
        buf = torch.empty(1, heads, total, dim, dtype=first.dtype, device=first.device)
        torch.cat([getattr(b, which)[layer] for b in blocks], dim=1, out=buf[0, :, :k])
    return buf[:, :, :k]


def _key(parent: Block | None, tokens: tuple[int, ...]) -> int:
    return hash((parent.key if parent is not None else 0, tokens))
