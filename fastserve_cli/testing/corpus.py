"""The stdlib sources as a corpus: every test and benchmark trains tokenizers and cuts prompts from them.

Why the stdlib: it is on every machine that runs Python, so nothing is downloaded and runs are reproducible.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Sequence

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE_MODULES = [
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "glob.py",
    "shlex.py",
    "colorsys.py",
    "keyword.py",
]


def stdlib_texts(names: Sequence[str] = SAMPLE_MODULES) -> list[str]:
    """The named stdlib modules' sources (paths relative to the stdlib directory)."""
    return [(STDLIB / name).read_text(encoding="utf-8") for name in names]


def stdlib_sources(recursive: bool = False, errors: str = "replace") -> list[str]:
    """Every stdlib .py source in sorted path order: the top level only, or the whole tree (tests included)."""
    files = sorted(STDLIB.rglob("*.py") if recursive else STDLIB.glob("*.py"))
    return [f.read_text(encoding="utf-8", errors=errors) for f in files]


def corpus_ids(tokenizer, names: Sequence[str]) -> list[int]:
    """The named modules joined by newlines, tokenized: the token stream prompts are cut from."""
    return tokenizer("\n".join(stdlib_texts(names)))["input_ids"]


def cut_prompt(tokenizer, ids: list[int], length: int, rng: random.Random) -> str:
    """`length` consecutive tokens of `ids` at a seeded offset, decoded (re-encoding may differ by a token)."""
    start = rng.randrange(0, len(ids) - length)
    return tokenizer.decode(ids[start : start + length])
