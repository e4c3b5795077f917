"""Random-init tokenizers and models built from configs: nothing comes from a hub, so tests run offline.

One builder for every size the project measures: the tiny 2-layer GPT-2/Llama the tests serve and train, the
small GPT-2 shapes of the scheduling benchmark, and the GPT-2-small shape (124M) of the serve, export and
optimize benchmarks. Same seed and config give the same weights, so a model dir rebuilt later is the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from fastserve_cli.testing.corpus import stdlib_texts

EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class GPT2Shape:
    """Layers x width (heads of 64 unless given); vocab_size None means the tokenizer's size."""

    layers: int
    width: int
    heads: int | None = None
    vocab_size: int | None = None

    @property
    def num_heads(self) -> int:
        return self.heads or max(1, self.width // 64)


TINY = GPT2Shape(layers=2, width=64, heads=4)
GPT2_SMALL = GPT2Shape(layers=12, width=768, heads=12, vocab_size=50257)  # GPT-2-small: 124M parameters


def train_tokenizer(texts: Iterable[str], vocab_size: int, chat_tokens: bool = False, out: Path | None = None):
    """A byte-level BPE (the project's own trainer) with the EOS/pad every model here uses; saved if `out`."""
    from fastserve_cli.core.tokenizer import train_bpe

    tokenizer = train_bpe(
        texts,
        vocab_size=vocab_size,
        min_frequency=2,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=CHAT_TOKENS if chat_tokens else [],
    )
    if out is not None:
        tokenizer.save_pretrained(out)
    return tokenizer


def tiny_tokenizer(out: Path) -> Path:
    """The tests' tokenizer: 512 tokens trained on a few stdlib modules, with chat markers."""
    train_tokenizer(stdlib_texts(), vocab_size=512, chat_tokens=True, out=out)
    return out


def token_ids(tokenizer) -> dict[str, Any]:
    """The vocabulary size and special ids a config needs to agree with its tokenizer (BOS = EOS, as GPT-2)."""
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def gpt2_config(shape: GPT2Shape, tokenizer=None, positions: int = 1024, **overrides: Any):
    """A GPT2Config of `shape`; vocabulary and special ids from `tokenizer` when given, `overrides` last."""
    from transformers import GPT2Config

    ids = token_ids(tokenizer) if tokenizer is not None else {}
    if shape.vocab_size is not None:
        ids["vocab_size"] = shape.vocab_size
    return GPT2Config(
        n_layer=shape.layers, n_embd=shape.width, n_head=shape.num_heads, n_positions=positions, **{**ids, **overrides}
    )


def tiny_llama_config(tokenizer=None, positions: int = 512, **overrides: Any):
    """Llama with grouped-query attention (4 heads, 2 KV heads), 2 layers, 64 wide; ids as `gpt2_config`."""
    from transformers import LlamaConfig

    ids = token_ids(tokenizer) if tokenizer is not None else {}
    return LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        **{**ids, **overrides},
    )


def save_random_model(config, out: Path, tokenizer=None, seed: int = 0) -> Path:
    """Random weights (seeded) for `config`, saved with the tokenizer and generation config into `out`.

    Written to a temp dir and renamed, so an interrupted build never leaves a model dir a later run would reuse.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve_cli.core.rundir import staged_dir

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with staged_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def make_tiny_model(architecture: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide gpt2 or llama with random weights, saved with its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if architecture == "gpt2":
        config = gpt2_config(TINY, tokenizer, positions=512)
    elif architecture == "llama":
        config = tiny_llama_config(tokenizer)
    else:
        raise ValueError(f"architecture {architecture!r}: gpt2 or llama")
    return save_random_model(config, out, tokenizer, seed)


def gpt2_model_dir(out: Path, shape: GPT2Shape, make_tokenizer: Callable[[], Any], seed: int = 0) -> Path:
    """A GPT-2 of `shape` at `out`, built once: an existing model dir is reused as it is (benchmarks keep theirs
    between runs), and the tokenizer, slow to train at 50k tokens, is only made when the model is."""
    if (Path(out) / "config.json").is_file():
        return Path(out)
    tokenizer = make_tokenizer()
    return save_random_model(gpt2_config(shape, tokenizer), out, tokenizer, seed)


def gpt2_small_dir(model_dir: Path) -> Path:
    """The benchmarks' model: GPT-2-small shape (12 layers, 768 wide), random init, fp32, with a 50257-token
    BPE of the stdlib tree (built once, then reused from `model_dir`)."""
    from dataclasses import replace

    from fastserve_cli.testing.corpus import stdlib_sources

    def tokenizer():
        return train_tokenizer(stdlib_sources(recursive=True, errors="ignore"), 50257, chat_tokens=True)

    return gpt2_model_dir(model_dir, replace(GPT2_SMALL, vocab_size=None), tokenizer)
