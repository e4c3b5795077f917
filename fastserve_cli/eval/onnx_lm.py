"""An lm-eval model over our ONNX export (`OnnxCausalLM`), scored the way lm-eval's `hf` model scores.

lm-eval's own ONNX backends read Model Builder exports (genai_config.json); ours is a plain decoder graph with
optimum's names, so this small `TemplateLM` runs it: one full-logits forward per request for log-likelihoods
(the same truncation and slicing as `HFLM._loglikelihood_tokens`, so torch and ONNX numbers are comparable),
HFLM's rolling windows for perplexity, and a greedy KV-cache loop for generation tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the stage reports the missing extra; importing this module must not fail
    TemplateLM = object  # type: ignore[assignment,misc]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class OnnxEvalLM(TemplateLM):
    """lm-eval `LM` for an `onnx/` directory written by `fastserve export` (graph + config + tokenizer)."""

    def __init__(
        self,
        onnx_dir: str | Path,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        threads: int | None = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        from fastserve_cli.models.onnx import OnnxCausalLM

        self.onnx_dir = Path(onnx_dir)
        self.session = OnnxCausalLM(self.onnx_dir, threads=threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.onnx_dir)
        config = json.loads((self.onnx_dir / "config.json").read_text(encoding="utf-8"))
        self._max_length = int(max_length or config.get("n_positions") or config.get("max_position_embeddings") or 2048)
        self._max_gen_toks = max_gen_toks
        self.batch_size = batch_size  # lm-eval reads it; one request per forward here

    # -- what lm-eval asks of a model ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """As HFLM: BOS when the tokenizer has one, else EOS (the first token of a rolling window)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> str:
        return "cpu"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- scoring ---------------------------------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float32 logits of one sequence (no past)."""
        x = np.asarray([ids], dtype=np.int64)
        out, _ = self.session.step(x, np.ones_like(x), np.arange(len(ids), dtype=np.int64)[None, :])
        return out[0].astype(np.float32)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        results = []
        for cache_key, context_enc, continuation_enc in requests:
            full = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            inp = full[:-1]
            contlen = len(continuation_enc)
            logp = _log_softmax(self.logits(inp)[len(inp) - contlen :])
            targets = np.asarray(full[-contlen:], dtype=np.int64)
            total = float(logp[np.arange(contlen), targets].sum())
            greedy = bool((logp.argmax(-1) == targets).all())
            results.append((total, greedy))
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, (total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in [req.args for req in requests]:
            windows = [
                (None,) + w
                for w in map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the graph's KV cache, cut at the first stop string."""
        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            text = self.tok_decode(self._greedy(ids, max_new, until))
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> list[int]:
        x = np.asarray([ids], dtype=np.int64)
        mask = np.ones_like(x)
        logits, past = self.session.step(x, mask, np.arange(len(ids), dtype=np.int64)[None, :])
        new: list[int] = []
        for _ in range(max_new):
            token = int(logits[0, -1].argmax())
            if token == self.eot_token_id:
                break
            new.append(token)
            if until and any(s and s in self.tok_decode(new) for s in until):
                break
            mask = np.ones((1, len(ids) + len(new)), dtype=np.int64)
            position = np.asarray([[len(ids) + len(new) - 1]], dtype=np.int64)
            logits, past = self.session.step(np.asarray([[token]], dtype=np.int64), mask, position, past)
        return new
