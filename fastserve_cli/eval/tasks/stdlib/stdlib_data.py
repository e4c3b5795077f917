"""Data for the offline stdlib tasks, built from the running Python's standard library (nothing is downloaded).

Held out: the files under the stdlib's test directories (`test/`, `tests/`, `idle_test/`), which the quickstart
recipe excludes from training, so the tasks measure code the model never saw. The selection and the
distractors are seeded, so every run (and every model compared) sees the same documents in the same order;
lm-eval's `limit` takes the first N.

lm-eval calls these through `custom_dataset: !function stdlib_data.<name>` with the task's metadata as keyword
arguments; each returns a `datasets.DatasetDict` with a `test` split.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Any

HELD_OUT_DIRS = ("test", "tests", "idle_test")
SEED = 1234
CONTEXT_LINES = 8
CHOICES = 4
MIN_LINE_CHARS = 12  # a line worth predicting (not `)` or `else:`)
FILE_CHARS = (400, 3000)  # whole-file perplexity on short files keeps a run cheap
MAX_DOCS = 200


def held_out_files(stdlib: str | Path | None = None) -> list[Path]:
    """Python files under the stdlib's test directories, in a seeded order (site-packages never)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and any(d in HELD_OUT_DIRS for d in p.relative_to(root).parts[:-1])
    )
    random.Random(SEED).shuffle(files)
    return files


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def next_line_docs(stdlib: str | Path | None = None, max_docs: int = MAX_DOCS) -> list[dict[str, Any]]:
    """One question per file: 8 lines of context, the true next line and 3 other lines of the same file."""
    rng = random.Random(SEED)
    docs = []
    for path in held_out_files(stdlib):
        text = _read(path)
        if text is None:
            continue
        lines = text.splitlines()
        candidates = [i for i in range(CONTEXT_LINES, len(lines)) if len(lines[i].strip()) >= MIN_LINE_CHARS]
        pool = sorted({lines[i] for i in candidates})
        if len(pool) < CHOICES:
            continue
        i = rng.choice(candidates)
        answer = lines[i]
        distractors = rng.sample([line for line in pool if line != answer], CHOICES - 1)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        context = "\n".join(lines[i - CONTEXT_LINES : i]) + "\n"
        docs.append({"file": path.name, "context": context, "choices": choices, "label": choices.index(answer)})
        if len(docs) >= max_docs:
            break
    return docs


def file_docs(stdlib: str | Path | None = None, max_docs: int = MAX_DOCS) -> list[dict[str, Any]]:
    """Whole held-out files of 400-3000 characters."""
    docs = []
    for path in held_out_files(stdlib):
        text = _read(path)
        if text is not None and FILE_CHARS[0] <= len(text) <= FILE_CHARS[1]:
            docs.append({"file": path.name, "text": text})
            if len(docs) >= max_docs:
                break
    return docs


def _dataset(docs: list[dict[str, Any]]):
    import datasets

    if not docs:
        raise ValueError(f"no held-out files under {sysconfig.get_paths()['stdlib']} ({', '.join(HELD_OUT_DIRS)})")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def next_line(**_: Any):
    return _dataset(next_line_docs())


def files(**_: Any):
    return _dataset(file_docs())
