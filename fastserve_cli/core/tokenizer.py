"""Tokenizers: train a byte-level BPE with `tokenizers`, or load one with AutoTokenizer.

Either way the result is a `PreTrainedTokenizerFast` with an EOS, a PAD and a chat template, saved in
the HF layout (tokenizer.json, tokenizer_config.json) so `AutoTokenizer.from_pretrained` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from fastserve_cli.core.errors import UserError

# ChatML, with {% generation %} markers so transformers can return an assistant-token mask.
# ChatML with a Hermes/Qwen-style tools section: `tools` go into the system turn, assistant `tool_calls` are
# rendered as <tool_call>{"name", "arguments"}</tool_call> blocks, and role "tool" results as <tool_response>
# blocks in a user turn. Without tools the output is plain ChatML, byte for byte.
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'"
    " 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '"
    ' \'<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": \''
    " '<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{% if loop.first and message['content'] %}{{ '\n' }}{% elif not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{% if fn['arguments'] is string %}{{ fn['arguments'] }}{% else %}{{ fn['arguments'] | tojson }}{% endif %}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int,
    eos_token: str,
    pad_token: str,
    extra_special_tokens: list[str],
    chat_template: str | None = None,
):
    """Train a byte-level BPE (GPT-2 style pre-tokenization) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([eos_token, pad_token, *extra_special_tokens]))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_batched(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos_token,
        bos_token=eos_token,
        unk_token=None,
        pad_token=pad_token,
        additional_special_tokens=[t for t in specials if t not in (eos_token, pad_token)],
    )
    tokenizer.chat_template = chat_template or CHATML_TEMPLATE
    tokenizer.model_max_length = 1_000_000
    return tokenizer


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_tokenizer(path: str | Path, chat_template: str | None = None, trust_remote_code: bool = False):
    """Load a local tokenizer; give it a PAD (= EOS) and a chat template if it lacks them."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"tokenizer.path {path}: directory not found; point it at a saved tokenizer or unset it to train one"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"tokenizer.path {path}: no loadable tokenizer there ({str(err).splitlines()[0]})") from None
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer.path {path}: the tokenizer has no eos_token; set one in its tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
