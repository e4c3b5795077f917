"""The run directory: every artifact path in one place, plus an atomic manifest of stage results."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from fastserve_cli.core.errors import UserError

MANIFEST_VERSION = 1
TRACKED_LIBRARIES = (
    "fastserve",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "accelerate",
    "deepspeed",
    "peft",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
)


@dataclass
class StageResult:
    """What a stage hands back: the artifacts it wrote (relative to the run dir) and its metrics."""

    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fingerprint(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp dir; on success it replaces `final`, on any error it is deleted.

    Readers therefore see either the old complete artifact or the new complete one, never a half.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        backup = None
        if final.exists():
            backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, backup)
        os.replace(tmp, final)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class RunDir:
    """Knows where every stage reads and writes inside one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # -- artifact paths ------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data_dir(self) -> Path:
        """A `datasets.DatasetDict` (train, validation) saved with save_to_disk."""
        return self.root / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot_path(self) -> Path:
        return self.root / "loss.png"

    @property
    def samples_path(self) -> Path:
        """Greedy samples of the trained model (train stage)."""
        return self.root / "samples.txt"

    @property
    def optimized_dir(self) -> Path:
        return self.root / "optimized"

    def variant_dir(self, name: str) -> Path:
        return self.optimized_dir / name

    @property
    def report_path(self) -> Path:
        return self.optimized_dir / "report.json"

    @property
    def onnx_dir(self) -> Path:
        return self.root / "onnx"

    @property
    def parity_path(self) -> Path:
        return self.onnx_dir / "parity.json"

    @property
    def parity_failed_path(self) -> Path:
        """Parity results of an export that failed (its onnx/ was discarded, so they live beside it)."""
        return self.root / "onnx.parity-failed.json"

    @property
    def serve_profile_path(self) -> Path:
        return self.root / "serve_profile.json"

    def rel(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    # -- manifest -------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def load_manifest(self) -> dict[str, Any]:
        """The manifest as readers should see it: a `running` stage whose process died reads as failed."""
        manifest = self._read_manifest()
        for entry in manifest["stages"].values():
            if entry.get("status") == "running" and "pid" in entry and not _pid_alive(entry["pid"]):
                entry.update(status="failed", error=f"interrupted (process {entry['pid']} is gone)")
        return manifest

    def _read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"version": MANIFEST_VERSION, "stages": {}}
        try:
            manifest = read_json(self.manifest_path)
        except json.JSONDecodeError:
            raise UserError(
                f"{self.manifest_path}: manifest is not valid JSON; delete the run directory and run again"
            ) from None
        manifest.setdefault("stages", {})
        return manifest

    def remove_stale_temps(self) -> None:
        """Delete temp files/dirs a killed stage left behind (only one stage runs per run dir)."""
        for base in (self.root, self.optimized_dir):
            if base.is_dir():
                for path in base.glob(".*.tmp"):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.load_manifest()["stages"].get(name)

    def update_stage(self, name: str, **fields: Any) -> dict[str, Any]:
        manifest = self._read_manifest()
        entry = manifest["stages"].setdefault(name, {})
        entry.update(fields)
        manifest["updated_at"] = now_iso()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.manifest_path, manifest)
        return entry

    def is_done(self, name: str) -> bool:
        entry = self.stage(name)
        return bool(entry and entry.get("status") == "done")

    def require(self, stage: str, hint: str | None = None) -> None:
        """Raise a user error unless `stage` finished in this run directory."""
        if not self.is_done(stage):
            raise UserError(hint or f"{self.root}: no finished {stage} stage here; run `fastserve {stage}` first")
