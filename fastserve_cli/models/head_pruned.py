"""Head-pruned GPT-2 directories: re-shape the attention to the kept heads before the weights load.

transformers 5's GPT2Attention sizes itself from `n_embd / n_head` and lost `prune_heads`, so a head-pruned
GPT-2 keeps `n_head` (it fixes head_dim) and records the kept count under HEADS_KEY in its config; plain
`from_pretrained` refuses such a checkpoint on the shape mismatch instead of loading garbage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastserve_cli.core.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

HEADS_KEY = "fastserve_attention_heads"


def is_conv1d(module: "nn.Module") -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def apply_pruned_heads(model: "nn.Module") -> "nn.Module":
    """Make GPT-2 attention modules match `fastserve_attention_heads` (shapes only; weights load after).

    Needed because transformers 5's GPT2Attention sizes itself from n_embd; a no-op for other models.
    """
    from transformers.pytorch_utils import Conv1D

    heads = getattr(model.config, HEADS_KEY, None)
    if model.config.model_type != "gpt2" or not heads:
        return model
    head_dim = model.config.n_embd // model.config.n_head
    width = heads * head_dim
    for layer in model.transformer.h:
        attn = layer.attn
        if attn.c_attn.weight.shape[1] != 3 * width and is_conv1d(attn.c_attn):
            attn.c_attn = Conv1D(3 * width, model.config.n_embd)
        if is_conv1d(attn.c_proj) and attn.c_proj.weight.shape[0] != width:
            attn.c_proj = Conv1D(model.config.n_embd, width)
        attn.num_heads = heads
        attn.split_size = width
    return model


def load_head_pruned(path: Path, dtype: "torch.dtype") -> "nn.Module":
    """Load a GPT-2 directory whose config records pruned heads (plain from_pretrained cannot)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    model = apply_pruned_heads(AutoModelForCausalLM.from_config(config))
    state = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UserError(
            f"{path}: weights do not match the pruned config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); re-run `fastserve optimize`"
        )
    model.tie_weights()
    return model.to(dtype)
