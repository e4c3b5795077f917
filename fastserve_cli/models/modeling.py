"""Model construction: an architecture/size table for random init, local pretrained loading, LoRA.

Everything returns a plain transformers model (or a peft wrapper that `merge_lora` turns back into
one), so later stages never need fastserve code to load what training wrote.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from fastserve_cli.core.errors import UserError

# name -> (layers, width, heads). `small` is the benchmark model; `base` is GPT-2's 124M shape.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 4),
    "mini": (4, 256, 4),
    "small": (6, 384, 6),
    "base": (12, 768, 12),
    "medium": (24, 1024, 16),
}

# peft target modules per model_type; anything else gets peft's "all-linear".
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def special_token_ids(tokenizer) -> dict[str, int | None]:
    eos = tokenizer.eos_token_id
    return {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
    }


def architecture_config(architecture: str, size: str, vocab_size: int, max_positions: int, specials: dict[str, Any]):
    """A transformers config for a size from the table. Dropout is off: short from-scratch runs
    underfit rather than overfit, and dropout costs CPU time (nanoGPT does the same)."""
    from transformers import GPT2Config, LlamaConfig

    layers, width, heads = SIZES[size]
    if architecture == "gpt2":
        return GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            n_positions=max_positions,
            vocab_size=vocab_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **specials,
        )
    if architecture == "llama":
        intermediate = ((width * 8 // 3) + 63) // 64 * 64
        return LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            intermediate_size=intermediate,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions,
            vocab_size=vocab_size,
            tie_word_embeddings=True,
            **specials,
        )
    raise UserError(f"model.architecture {architecture!r}: unknown; use gpt2 or llama")


def apply_overrides(config, overrides: dict[str, Any], where: str = "model.config") -> None:
    """Set config attributes, refusing keys the config does not have (HF would accept typos silently)."""
    known = set(config.to_dict())
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"see the {type(config).__name__} docs for valid keys"
            raise UserError(f"{where}.{key}: not a {config.model_type} config key; {hint}")
        setattr(config, key, value)


def build_model(model_cfg, tokenizer, max_positions: int, seed: int):
    """Random-init model from the size table, or the local pretrained model; checked against the tokenizer."""
    import torch

    if model_cfg.pretrained:
        model = load_pretrained(model_cfg.pretrained, model_cfg.trust_remote_code)
        apply_overrides(model.config, model_cfg.config)
        check_vocabulary(model, tokenizer, model_cfg.pretrained)
        return model
    from transformers import AutoModelForCausalLM

    config = architecture_config(
        model_cfg.architecture, model_cfg.size, len(tokenizer), max_positions, special_token_ids(tokenizer)
    )
    apply_overrides(config, model_cfg.config)
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except RuntimeError as err:
        raise memory_error(err, "building the model") from None


def load_pretrained(path: str, trust_remote_code: bool = False):
    """AutoModelForCausalLM from a local directory, with errors that say what is missing."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"model.pretrained {path}: directory not found; point it at a save_pretrained directory")
    if not (directory / "config.json").is_file():
        raise UserError(f"model.pretrained {path}: no config.json there; it must be a transformers model directory")
    if not any((directory / name).is_file() for name in WEIGHT_FILES) and not any(directory.glob("*.safetensors")):
        raise UserError(
            f"model.pretrained {path}: config.json but no weights (model.safetensors); save the model with save_pretrained"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"model.pretrained {path}: cannot be loaded as a causal LM ({str(err).splitlines()[0]})"
        ) from None


def check_vocabulary(model, tokenizer, where: str) -> None:
    """The data was tokenized with the run's tokenizer; the model must cover its ids and agree on EOS
    (and, when the model directory ships a tokenizer, have exactly that vocabulary)."""
    own = model_tokenizer_vocab(where)
    if own is not None and own != tokenizer.get_vocab():
        raise UserError(
            f"model.pretrained {where}: the model's tokenizer differs from the run's (the data was tokenized "
            f"with another vocabulary); preprocess with tokenizer.path: {where}"
        )
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise UserError(
            f"model.pretrained {where}: embedding has {rows} rows but the run's tokenizer has {len(tokenizer)} tokens; "
            f"preprocess with tokenizer.path: {where} so the data uses the model's own tokenizer"
        )
    eos = model.config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    if eos is not None and tokenizer.eos_token_id not in eos_ids:
        raise UserError(
            f"model.pretrained {where}: its eos_token_id {eos} differs from the run tokenizer's "
            f"{tokenizer.eos_token_id} ({tokenizer.eos_token}); preprocess with tokenizer.path: {where}"
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def model_tokenizer_vocab(path: str) -> dict[str, int] | None:
    directory = Path(path)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory).get_vocab()
    except (OSError, ValueError):
        return None


def apply_lora(model, lora_cfg):
    """Wrap the model with peft LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    targets = lora_cfg.target_modules or LORA_TARGETS.get(model_type, "all-linear")
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=model_type == "gpt2",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(
            f"train.lora.target_modules {targets}: {str(err).splitlines()[0]}; name modules of this model"
        ) from None


def merge_lora(model):
    """Fold the adapters into the base weights so `model/` is a plain transformers model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def parameter_counts(model) -> dict[str, int]:
    params = list(model.parameters())
    unique = {p.data_ptr(): p for p in params}.values()
    return {
        "parameters": sum(p.numel() for p in unique),
        "trainable_parameters": sum(p.numel() for p in unique if p.requires_grad),
    }


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N for the weights plus 12·L·H·T for attention."""
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    width = getattr(config, "n_embd", None) or config.hidden_size
    vocab = config.vocab_size
    if config.model_type == "gpt2":
        per_layer = 12 * width * width
    else:
        per_layer = 4 * width * width + 3 * width * config.intermediate_size
    weights = layers * per_layer + vocab * width  # the LM head matmul counts; embedding lookups do not
    return 6.0 * weights + 12.0 * layers * width * seq_len


def memory_error(err: BaseException, doing: str) -> BaseException:
    """Turn an allocation failure into a UserError naming the knobs; other errors pass through."""
    text = str(err)
    if isinstance(err, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text:
        return UserError(
            f"out of memory while {doing}; lower train.per_device_train_batch_size (raise "
            f"train.gradient_accumulation_steps to keep the batch), data.block_size, or model.size"
        )
    return err
