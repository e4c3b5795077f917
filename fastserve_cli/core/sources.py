"""The recipe's input files: `data.paths` (files, directories, globs) expanded once, the same way for
the preprocess stage and for the pipeline's fingerprint of the inputs."""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path
from typing import Iterator

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import DataConfig


def _has_magic(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _excluded_dir(path: str, exclude: list[str]) -> bool:
    """True when every file below `path` is excluded: a pattern ending in `*` already matches `path/`."""
    return any(pat.endswith("*") and fnmatch.fnmatch(path + os.sep, pat) for pat in exclude)


def _walk_glob(base: str, parts: tuple[str, ...], exclude: list[str]) -> Iterator[str]:
    """Glob semantics (`**` = zero or more directories, hidden names skipped), pruning excluded dirs.

    `glob.glob` would walk every excluded tree too (all of site-packages for the quickstart's pattern).
    """
    head, tail = parts[0], parts[1:]
    if head == "**":
        if tail:
            yield from _walk_glob(base, tail, exclude)
        else:  # a trailing ** matches every file below
            yield from (entry.path for entry in _scan(base) if entry.is_file() and not entry.name.startswith("."))
        for entry in _scan(base):
            if entry.is_dir() and not entry.name.startswith(".") and not _excluded_dir(entry.path, exclude):
                yield from _walk_glob(entry.path, parts, exclude)
        return
    for entry in _scan(base):
        if entry.name.startswith(".") and not head.startswith(".") or not fnmatch.fnmatch(entry.name, head):
            continue
        if tail:
            if entry.is_dir() and not _excluded_dir(entry.path, exclude):
                yield from _walk_glob(entry.path, tail, exclude)
        elif entry.is_file():
            yield entry.path


def _scan(path: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(path))
    except (NotADirectoryError, FileNotFoundError, PermissionError):
        return []


def expand_glob(pattern: str, exclude: list[str]) -> list[str]:
    parts = Path(pattern).parts
    first_magic = next(i for i, part in enumerate(parts) if _has_magic(part))
    base = str(Path(*parts[:first_magic])) if first_magic else "."
    return list(_walk_glob(base, parts[first_magic:], exclude))


def find_files(cfg: DataConfig) -> list[str]:
    """Expand data.paths (files, directories, globs) into a sorted, de-duplicated file list."""
    if not cfg.paths:
        raise UserError("data.paths: no input given; list files, directories or globs (or set data.dataset)")
    files: list[str] = []
    for i, entry in enumerate(cfg.paths):
        if _has_magic(entry):
            matches = expand_glob(entry, cfg.exclude)
            if not matches and not glob.glob(entry, recursive=True):
                raise UserError(f"data.paths[{i}] {entry}: the glob matches no files; check the pattern")
        elif os.path.isdir(entry):
            matches = [m for m in glob.glob(os.path.join(entry, "**", "*"), recursive=True) if os.path.isfile(m)]
            if not matches:
                raise UserError(f"data.paths[{i}] {entry}: the directory holds no files")
        elif os.path.isfile(entry):
            matches = [entry]
        else:
            raise UserError(
                f"data.paths[{i}] {entry}: no such file or directory; fix the path (relative paths start at the recipe's folder)"
            )
        files.extend(matches)
    kept = sorted({f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in cfg.exclude)})
    if not kept or not files:
        raise UserError("data.exclude: every input file is excluded; loosen the patterns")
    return kept
