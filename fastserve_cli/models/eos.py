"""Which tokens end a reply: the document EOS plus the chat template's end-of-turn token(s).

A chat fine-tune learns to close its answer with the template's turn terminator (`<|im_end|>` for
ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma, `<|end|>` for Phi-3), not with the
document EOS. Generation has to stop at either, so the train stage writes the list into
`generation_config.eos_token_id` (as Qwen and Llama 3 ship it) and every consumer that decides when a
sequence is over (the serve engine, `samples.txt`) asks `stop_token_ids` here: one rule, one place.

The terminator is found by rendering the template, not by a table of known names: the first special
token the template puts after an assistant reply is that reply's end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

_QUESTION = "fastserve probe question"
_REPLY = "fastserve probe reply"
# The last assistant turn of a conversation, and one followed by another user turn: some templates
# close a reply only when another message follows.
_PROBES = (
    [{"role": "user", "content": _QUESTION}, {"role": "assistant", "content": _REPLY}],
    [
        {"role": "user", "content": _QUESTION},
        {"role": "assistant", "content": _REPLY},
        {"role": "user", "content": _QUESTION},
    ],
)


def reply_suffixes(tokenizer) -> list[str]:
    """What the chat template writes between the end of an assistant reply and the next message's text."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    suffixes = []
    for messages in _PROBES:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - templates raise arbitrary jinja/ValueErrors on shapes they refuse
            continue
        if not isinstance(text, str) or _REPLY not in text:
            continue
        tail = text[text.rindex(_REPLY) + len(_REPLY) :]
        suffixes.append(tail.split(_QUESTION, 1)[0])
    return suffixes


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (declared ones and added tokens marked special)."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the chat template closes an assistant turn with ([] when it has none)."""
    specials = special_ids(tokenizer)
    found: list[int] = []
    for suffix in reply_suffixes(tokenizer):
        first = next((i for i in tokenizer.encode(suffix, add_special_tokens=False) if i in specials), None)
        if first is not None and first != tokenizer.pad_token_id and first not in found:
            found.append(first)
    return found


def unmarked_terminator(tokenizer) -> str | None:
    """The text that closes a reply when it is not a single special token (so a model could not learn to
    stop with one token), else None. Whitespace-only endings are no terminator at all and return None."""
    specials = special_ids(tokenizer)
    for suffix in reply_suffixes(tokenizer)[:1]:
        ids = tokenizer.encode(suffix, add_special_tokens=False)
        if suffix.strip() and not any(i in specials for i in ids):
            return suffix.strip()
    return None


def as_id_list(value: Any) -> list[int]:
    """An `eos_token_id` field (int, list or None) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def reply_end_ids(tokenizer, *known: Any) -> list[int]:
    """Document EOS first, then the template's end-of-turn token(s), then ids already listed in `known`
    (a pretrained model's own generation config may name more, e.g. Llama 3.1's <|eom_id|>)."""
    ids = [*as_id_list(tokenizer.eos_token_id), *end_of_turn_ids(tokenizer)]
    for value in known:
        ids += as_id_list(value)
    return list(dict.fromkeys(ids))


def generation_eos(tokenizer, *known: Any) -> int | list[int]:
    """The value for `generation_config.eos_token_id`: a list when more than one token ends a reply."""
    ids = reply_end_ids(tokenizer, *known)
    return ids if len(ids) > 1 else ids[0]


def stop_token_ids(*eos_values: Any, tokenizer=None) -> set[int]:
    """Every id that ends a sequence: all listed `eos_token_id` values, plus (given a tokenizer) its EOS and
    its chat template's end-of-turn tokens, so models trained before the list was recorded stop too."""
    ids: set[int] = set()
    for value in eos_values:
        ids.update(as_id_list(value))
    if tokenizer is not None:
        ids.update(reply_end_ids(tokenizer))
    return ids


def model_dir_stop_ids(model_dir: str | Path, config: dict[str, Any] | None = None, tokenizer=None) -> set[int]:
    """`stop_token_ids` for a saved model directory: config.json, generation_config.json and its tokenizer."""
    directory = Path(model_dir)
    values: list[Any] = []
    for name in ("config.json", "generation_config.json"):
        if name == "config.json" and config is not None:
            values.append(config.get("eos_token_id"))
            continue
        path = directory / name
        if path.is_file():
            values.append(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
    if tokenizer is None:
        tokenizer = dir_tokenizer(directory)
    return stop_token_ids(*values, tokenizer=tokenizer)


def dir_tokenizer(directory: Path):
    """The directory's tokenizer, or None when it has none (a bare graph directory, say)."""
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception:  # noqa: BLE001 - best effort: the EOS ids from the configs still apply
        return None


def describe(tokenizer, ids: Iterable[int]) -> list[str]:
    """Token strings for ids (for metrics and messages)."""
    return [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]


def check_chat_terminator(tokenizer, trained: bool) -> None:
    """Refuse a trained tokenizer whose chat template ends replies with text that is not one special token:
    the model would have to spell the terminator out and no single token could stop generation."""
    text = unmarked_terminator(tokenizer)
    if text is not None and trained:
        from fastserve_cli.core.errors import UserError

        raise UserError(
            f"tokenizer.chat_template ends an assistant reply with {text!r}, which is not a special token, so "
            f"a chat model could not stop after its answer; add it to tokenizer.extra_special_tokens"
        )
