"""Training checkpoints: full state in `checkpoints/step-N/`, verified by checksums, newest-good wins.

Layout of one checkpoint (no pickles: tensors in safetensors, optimizer state through
`torch.load(weights_only=True)`, everything else JSON):

    model.safetensors    model weights (safetensors' save_model handles tied embeddings)
    optimizer.pt         optimizer.state_dict()
    scheduler.json       lr scheduler state
    rng.safetensors      torch CPU (and CUDA) generator states of every rank
    deepspeed/           DeepSpeed's own engine checkpoint instead of the three files above
    trainer_state.json   step, data position, early-stopping state, sha256 of every other file

trainer_state.json is written last and the directory is renamed into place, so a checkpoint either
exists whole or not at all; the checksums catch later damage, and loading then falls back to the
previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from fastserve_cli.core.rundir import atomic_write_json

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(Exception):
    """A checkpoint whose files are missing, unreadable or fail their checksum."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete-looking checkpoint, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def payload_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != STATE_FILE)


def write_model_state(directory: Path, model, optimizer, scheduler) -> None:
    """Model, optimizer and scheduler state of a non-DeepSpeed run (main process only)."""
    import torch
    from safetensors.torch import save_model

    save_model(model, str(directory / "model.safetensors"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "scheduler.json").write_text(json.dumps(scheduler.state_dict()), encoding="utf-8")


def write_rng(directory: Path, states: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in states.items()}, str(directory / "rng.safetensors"))


def seal(directory: Path, state: dict[str, Any]) -> None:
    """Record checksums of everything written so far, then the state file (last)."""
    state = dict(state, checksums={str(p.relative_to(directory)): sha256(p) for p in payload_files(directory)})
    atomic_write_json(directory / STATE_FILE, state)


def verify(directory: Path) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking every file against its checksum."""
    state_path = Path(directory) / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCheckpoint(f"{STATE_FILE} unreadable ({err})") from None
    for name, expected in state.get("checksums", {}).items():
        path = Path(directory) / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if sha256(path) != expected:
            raise CorruptCheckpoint(f"{name} fails its checksum")
    return state


def newest_valid(root: Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies; damaged ones are named and skipped."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            return path, verify(path)
        except CorruptCheckpoint as err:
            warn(f"checkpoint {path} is corrupt ({err}); falling back to the previous one")
    return None


def load_model_state(directory: Path, model, optimizer, scheduler) -> None:
    import torch
    from safetensors.torch import load_model

    load_model(model, str(directory / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text(encoding="utf-8")))


def read_rng(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "rng.safetensors"))


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was deleted."""
    removed = []
    for _, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
