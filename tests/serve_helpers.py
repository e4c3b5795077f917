"""Helpers shared by the serve tests."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from fastserve_cli.testing.server import running_server


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


def fcfs_server(model_dir: Path, name: str, log: Path) -> Iterator[str]:
    """A module fixture's body: `fastserve serve` (fcfs, batch 16) yielding its URL; a clean exit is asserted."""
    args = ("--model-name", name, "--max-batch-size", "16", "--scheduler", "fcfs")
    with running_server(model_dir, *args, log_path=log) as (url, proc):
        yield url
    assert proc.returncode == 0, log.read_text()[-2000:]


def openai_client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
