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

    Invariant while prefilled: the KV cache covers `all_ids[:-1]` when something was generated (the last
    sampled token is the next decode input), or nothing else. After a recompute-preemption the KV is dropped
    and the next prefill runs over `all_ids` (prompt + generated so far).
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
        """KV exists (on the device or in the host pool); the next iteration is a one-token decode."""
        return self.kv_location != "none"

    @property
    def num_tokens_next(self) -> int:
        """Tokens the next iteration of this request computes: the whole prefill, or one decode token."""
        return 1 if self.is_prefilled else self.prompt_len + self.num_generated

    # -- engine helpers -------------------------------------------------------------------
    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.num_generated
