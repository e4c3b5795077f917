"""One generation request as the engine, the schedulers and the KV-cache manager see it.

A client request with `n > 1` becomes n engine requests (one per choice); they share nothing but the prompt.
Schedulers may read the attributes listed in `fastserve_cli.serve.scheduler` and own `sched_state`;
everything else belongs to the engine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

KVLocation = Literal["none", "device", "host"]
_ids = itertools.count()


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI names). temperature == 0 means greedy."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # number of top alternatives to return per token; None = no logprobs
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit (serve/logit_bias.py)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(eq=False)
class Request:
    """State of one sequence from arrival to finish.

    Invariant: the KV cache covers `all_ids[:kv_tokens]`; the next iteration computes the tokens after it.
    Once prefilled, that is one token (`all_ids[-1]`, the last sampled one: a decode). Before, it is the rest of
    the prefill, `prefill_chunk` tokens at most per iteration when chunked prefill is on, and a token is sampled
    only after the last chunk. Prefill always continues from `kv_tokens`, whoever computed those (earlier chunks
    or a prefix cache, which may supply at most `len(all_ids) - 1` tokens: the last one is computed to sample
    the next token from). After a recompute-preemption the KV is dropped (`kv_tokens` 0) and the prefill runs over
    `all_ids` (prompt + generated so far) again.
    """

    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seq: int = field(default_factory=lambda: next(_ids))  # arrival order; stable key for packing
    request_id: str = ""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Any] = field(default_factory=list)  # per token: (logprob, [(token_id, logprob), ...])
    kv: Any = None  # backend-owned KV handle (None when kv_location == "none")
    kv_location: KVLocation = "none"
    kv_tokens: int = 0  # tokens covered by the KV cache
    prefill_chunk: int | None = None  # most prefill tokens per iteration (engine's --prefill-chunk-tokens); None: whole
    sched_state: Any = None  # owned by the scheduler
    finished: bool = False
    finish_reason: str | None = None
    cancelled: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    generator: Any = None  # torch.Generator when seeded
    on_output: Callable[[Any], None] | None = None  # engine thread -> API layer, one call per step
    detok: Any = None  # engine-owned incremental detokenizer
    grammar: Any = None  # grammar.GrammarState when the output is constrained (masked in sampling)
    grammar_spec: Any = None  # grammar.GrammarSpec it came from (a cluster replica compiles its own state)

    def __post_init__(self) -> None:
        self.request_id = self.request_id or f"req-{self.seq}"

    # -- attributes schedulers may read -------------------------------------------------
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_ids)

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def is_prefilled(self) -> bool:
        """KV exists (on the device or in the host pool) and covers all but the last token: the next iteration
        is a one-token decode (a prefill whose last chunk is one token is the same computation)."""
        return self.kv_location != "none" and self.kv_tokens + 1 >= self.total_len

    @property
    def is_started(self) -> bool:
        """Holds a KV cache (prefilled, or some prefill chunks done): counts against a started-cap."""
        return self.kv_location != "none"

    @property
    def prefill_remaining(self) -> int:
        """Prefill tokens still to compute before the first (next) token is sampled; 0 once prefilled."""
        return 0 if self.is_prefilled else self.total_len - self.kv_tokens

    @property
    def num_tokens_next(self) -> int:
        """Tokens the next iteration of this request computes: one decode token, or the rest of the prefill
        (at most `prefill_chunk` of it)."""
        if self.is_prefilled:
            return 1
        remaining = self.total_len - self.kv_tokens
        return remaining if self.prefill_chunk is None else min(remaining, self.prefill_chunk)

    @property
    def next_input_id(self) -> int:
        """The token a decode feeds: the last sampled one (or the last prompt token, when a prefill's last
        chunk is that one token)."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    # -- engine helpers -------------------------------------------------------------------
    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.num_generated
