"""The serving commands' OpenMP wait policy default (fastserve_cli/serve/omp.py), in fresh interpreters:
libgomp reads the variable when torch loads it, so each case needs its own process."""

import os
import subprocess
import sys

PROBE = (
    "import os, sys\n"
    "from fastserve_cli.serve.omp import prefer_passive_omp_wait\n"
    "if sys.argv[1] == 'after-torch':\n"
    "    import torch\n"
    "print(prefer_passive_omp_wait(), os.environ.get('OMP_WAIT_POLICY'))\n"
)


def _probe(mode: str = "plain", **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_passive_by_default_before_torch_loads():
    assert _probe() == "True PASSIVE"


def test_an_explicit_choice_is_kept():
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "False ACTIVE"
    assert _probe(GOMP_SPINCOUNT="10000") == "False None"


def test_nothing_changes_once_torch_is_loaded():
    assert _probe("after-torch") == "False None"


def test_the_serve_command_sets_it_before_torch(tmp_path):
    """`fastserve serve` on a directory that is not a model fails with a user error after the policy was set:
    the command reached its body without importing torch."""
    code = (
        "import os, sys\n"
        "from typer.testing import CliRunner\n"
        "from fastserve_cli.cli.main import app\n"
        f"result = CliRunner().invoke(app, ['serve', {str(tmp_path)!r}])\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE"
