"""Helpers shared by the serve tests."""

from __future__ import annotations


def make_short_context_model(tokenizer_dir, out, context: int):
    """What the train stage writes for `data.block_size: <context>`: a GPT-2 with n_positions = context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=context,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
