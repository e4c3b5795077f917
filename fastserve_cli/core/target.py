"""Which run a command works on when the user names none: `fastserve export --onnx` after `fastserve train`.

Order: the run directory in $FASTSERVE_RUN, else the one the last stage run from this working directory
wrote (recorded in `runs/.last`), else the only run under `./runs`. None or several: a one-line error
that lists the candidates and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastserve_cli.core.errors import UserError

RUNS_DIR = Path("runs")
LAST_FILE = RUNS_DIR / ".last"
ENV_VAR = "FASTSERVE_RUN"


def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file()


def remember_run(root: Path) -> None:
    """Record `root` as the run the last stage wrote from this working directory (atomically)."""
    LAST_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = LAST_FILE.with_name(f".last.{os.getpid()}.tmp")
    tmp.write_text(str(Path(root).resolve()) + "\n", encoding="utf-8")
    os.replace(tmp, LAST_FILE)


def _last_run() -> Path | None:
    try:
        recorded = Path(LAST_FILE.read_text(encoding="utf-8").strip())
    except OSError:
        return None
    return recorded if is_run_dir(recorded) else None


def _runs_here() -> list[Path]:
    if not RUNS_DIR.is_dir():
        return []
    return sorted(p for p in RUNS_DIR.iterdir() if p.is_dir() and is_run_dir(p))


def pick_run() -> tuple[Path, str]:
    """The run to use and why it was picked; UserError when there is no single answer."""
    named = os.environ.get(ENV_VAR)
    if named:
        if not is_run_dir(Path(named)):
            raise UserError(
                f"{ENV_VAR}={named}: not a run directory (no recipe.yaml); unset it or point it at runs/<name>"
            )
        return Path(named), f"${ENV_VAR}"
    last = _last_run()
    if last is not None:
        return last, f"{LAST_FILE}, the run the last stage wrote from here"
    runs = _runs_here()
    if len(runs) == 1:
        return runs[0], "the only run under ./runs"
    if not runs:
        raise UserError(
            f"no TARGET given and no run under ./runs; pass a recipe file or a run directory (or set {ENV_VAR})"
        )
    raise UserError(
        f"no TARGET given and {len(runs)} runs under ./runs ({', '.join(str(r) for r in runs)}); "
        f"pass one of them or set {ENV_VAR}"
    )


def resolve_target(target: str | None, say) -> str:
    """`target` as given, or the picked run directory (announced through `say`, one line on stderr)."""
    if target is not None:
        return target
    run, why = pick_run()
    try:
        shown = run.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = run
    say(f"using run {shown} ({why})")
    return str(run)
