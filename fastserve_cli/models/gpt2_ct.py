"""GPT-2 variants in the compressed-tensors format, written as the equivalent OPT checkpoint.

compressed-tensors 0.20 quantizes `nn.Linear` (and `nn.Embedding`) only: `apply_quantization_config` gives a
scheme to nothing else, so under `from_pretrained` the `Conv1D` layers of transformers' GPT-2 match none of
the `weight_packed` tensors and keep random weights. So a GPT-2 variant is saved as the OPT model that
computes the same function with `nn.Linear` layers, which stock transformers and vLLM load:

- OPT with `do_layer_norm_before`, `enable_bias`, GPT-2's `activation_function` and LayerNorm eps 1e-5 is
  GPT-2's block: pre-LN attention and MLP with biases, a final LayerNorm, an untied lm_head.
- Conv1D [in, out] weights become Linear [out, in]; the fused `c_attn` rows split into q_proj, k_proj and
  v_proj (GPT-2 lays them out as [q heads, k heads, v heads]); a row split is exact on quantized tensors
  too (per-row scales, groups along the input).
- OPT's learned positions are offset by 2: the file holds GPT-2's `wpe` behind two zero rows. OPT counts
  positions from the attention mask, so the two agree on unpadded (and right-padded) inputs.

Why OPT and not GPTBigCode (GPT-2 with nn.Linear and a per-head fused qkv): transformers 5.25's
GPTBigCode `_init_weights` reads `attn.c_proj.weight` directly, which a packed (W4A16/W8A16) checkpoint
does not have, so `from_pretrained` raises AttributeError there; OPT's init has no such access.

`quantization_config.fastserve.gpt2_config` keeps the GPT-2 config, and `load_causal_lm` maps the file back
to GPT-2, so serving, export and the kernels see the model they were written for. Not mappable (these keep
the fastserve format, quantized.py): head-pruned GPT-2, `scale_attn_by_inverse_layer_idx`, cross-attention
and a LayerNorm eps other than 1e-5 (OPT's LayerNorm has no eps setting).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fastserve_cli.models.head_pruned import HEADS_KEY

if TYPE_CHECKING:  # pragma: no cover
    import torch

SAVED_AS = "opt"
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
OPT_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")
# GPT-2 layer-relative module -> OPT's (c_attn is split, see QKV)
IN_LAYER = {"ln_1": "self_attn_layer_norm", "attn.c_proj": "self_attn.out_proj", "ln_2": "final_layer_norm"}
IN_LAYER |= {"mlp.c_fc": "fc1", "mlp.c_proj": "fc2"}
TOP = {"transformer.wte": "model.decoder.embed_tokens", "transformer.wpe": "model.decoder.embed_positions"}
TOP |= {"transformer.ln_f": "model.decoder.final_layer_norm", "lm_head": "lm_head"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def unmappable(config: dict[str, Any]) -> str | None:
    """Why this GPT-2 config has no OPT equivalent, or None when it has one."""
    if config.get(HEADS_KEY):
        return "its attention heads were pruned (OPT's attention is as wide as the residual stream)"
    if config.get("scale_attn_by_inverse_layer_idx"):
        return "scale_attn_by_inverse_layer_idx is set (OPT has no per-layer attention scaling)"
    if config.get("add_cross_attention"):
        return "it has cross-attention"
    if abs(float(config.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        return "its layer_norm_epsilon is not 1e-5 (OPT's LayerNorm eps is fixed)"
    return None


def opt_config(gpt2: dict[str, Any]) -> dict[str, Any]:
    """The OPT config.json of a GPT-2 config dict (no quantization section)."""
    width = gpt2["n_embd"]
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version")
    return {
        **{k: gpt2[k] for k in keep if k in gpt2},
        "model_type": SAVED_AS,
        "architectures": ["OPTForCausalLM"],
        "vocab_size": gpt2["vocab_size"],
        "hidden_size": width,
        "word_embed_proj_dim": width,
        "num_hidden_layers": gpt2["n_layer"],
        "num_attention_heads": gpt2["n_head"],
        "ffn_dim": gpt2.get("n_inner") or 4 * width,
        "max_position_embeddings": gpt2["n_positions"],
        "activation_function": gpt2.get("activation_function", "gelu_new"),
        "do_layer_norm_before": True,
        "_remove_final_layer_norm": False,
        "layer_norm_elementwise_affine": True,
        "enable_bias": True,
        "dropout": gpt2.get("resid_pdrop", 0.1),
        "attention_dropout": gpt2.get("attn_pdrop", 0.1),
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
        "init_std": gpt2.get("initializer_range", 0.02),
        "use_cache": True,
        "tie_word_embeddings": False,
    }


def gpt2_config(section: dict[str, Any]) -> Any:
    """The GPT2Config kept in a compressed-tensors section written by to_opt."""
    from transformers import GPT2Config

    return GPT2Config.from_dict(dict(section["fastserve"]["gpt2_config"]))


def opt_names(module: str) -> list[str]:
    """OPT module name(s) of a GPT-2 module name (c_attn -> q/k/v_proj)."""
    if module in TOP:
        return [TOP[module]]
    match = LAYER.match(module)
    if match is None:
        raise ValueError(f"{module}: no OPT equivalent")
    prefix, rest = f"model.decoder.layers.{match.group(1)}.", match.group(2)
    if rest == "attn.c_attn":
        return [prefix + name for name in QKV]
    if rest not in IN_LAYER:
        raise ValueError(f"{module}: no OPT equivalent")
    return [prefix + IN_LAYER[rest]]


def to_opt(
    tensors: dict[str, "torch.Tensor"], config: dict[str, Any], quantized: set[str]
) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """GPT-2 tensors (dense Conv1D [in, out]; quantized layers already [out, in]) -> OPT's, and its config."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, leaf = key.rsplit(".", 1)
        rest = LAYER.match(module)
        if rest and rest.group(2) in CONV1D and module not in quantized and leaf == "weight":
            tensor = tensor.t()  # dense Conv1D [in, out] -> Linear [out, in]
        if module == "transformer.wpe":
            tensor = torch.cat([tensor.new_zeros(POSITION_OFFSET, tensor.shape[1]), tensor])
        names = opt_names(module)
        if len(names) == 1:
            out[f"{names[0]}.{leaf}"] = tensor.contiguous()
            continue
        for i, name in enumerate(names):  # q, k, v
            if leaf == "weight_shape":
                part = torch.tensor([int(tensor[0]) // 3, int(tensor[1])], dtype=tensor.dtype)
            else:
                part = tensor.chunk(3, dim=0)[i]
            out[f"{name}.{leaf}"] = part.contiguous()
    return out, opt_config(config)


def gpt2_module(module: str) -> str:
    """GPT-2 module name of an OPT module name (q/k/v_proj -> c_attn)."""
    for gpt2, opt in TOP.items():
        if module == opt:
            return gpt2
    match = OPT_LAYER.match(module)
    if match is None:
        raise ValueError(f"{module}: not a module of a GPT-2 saved as OPT")
    prefix, rest = f"transformer.h.{match.group(1)}.", match.group(2)
    if rest in QKV:
        return prefix + "attn.c_attn"
    for gpt2, opt in IN_LAYER.items():
        if rest == opt:
            return prefix + gpt2
    raise ValueError(f"{module}: not a module of a GPT-2 saved as OPT")


def from_opt(tensors: dict[str, "torch.Tensor"]) -> tuple[dict[str, "torch.Tensor"], list[str]]:
    """The inverse of to_opt's tensor mapping; returns GPT-2 tensors and the quantized GPT-2 module names."""
    import torch

    quantized = {gpt2_module(k[: -len(".weight_scale")]) for k in tensors if k.endswith(".weight_scale")}
    parts: dict[str, list[torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, leaf = key.rsplit(".", 1)
        name = gpt2_module(module)
        if module.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"):
            parts.setdefault(f"{name}.{leaf}", [None, None, None])["qkv".index(module[-6])] = tensor
            continue
        if name == "transformer.wpe":
            tensor = tensor[POSITION_OFFSET:]
        out[f"{name}.{leaf}"] = tensor
    for key, (q, k, v) in parts.items():
        if key.endswith(".weight_shape"):
            out[key] = torch.tensor([int(q[0]) * 3, int(q[1])], dtype=q.dtype)
        else:
            out[key] = torch.cat([q, k, v], dim=0)
    for key in list(out):
        module, leaf = key.rsplit(".", 1)
        rest = LAYER.match(module)
        if rest and rest.group(2) in CONV1D and module not in quantized and leaf == "weight":
            out[key] = out[key].t().contiguous()  # dense Linear [out, in] -> Conv1D [in, out]
    return out, sorted(quantized)
