"""train on real preprocessed stdlib text: loadable output, exact resume after SIGKILL, SIGTERM,
corrupt checkpoints, LoRA, bad input, and (slow) 2-process DDP and DeepSpeed ZeRO-2 on CPU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.pipeline import execute, prepare_run_dir
from fastserve_cli.core.recipe import Recipe, dump_recipe, resolve_paths
from fastserve_cli.core.rundir import RunDir
from fastserve_cli.testing.corpus import stdlib_texts

TRAIN = {
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "eval_steps": 4,
    "save_steps": 4,
    "warmup_steps": 2,
    "eval_max_batches": 2,
    "max_steps": 8,
}


def make_recipe(
    root: Path, train: dict | None = None, model: dict | None = None, tokenizer: dict | None = None
) -> Recipe:
    raw = {
        "name": "t",
        "run_dir": str(root / "run"),
        "data": {"paths": [str(root.parent / "corpus" / "*.txt")], "block_size": 64, "validation_fraction": 0.2},
        "tokenizer": tokenizer or {"vocab_size": 400},
        "model": model or {"architecture": "gpt2", "size": "tiny"},
        "train": {**TRAIN, **(train or {})},
    }
    return resolve_paths(Recipe.model_validate(raw), root)


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    (root / "corpus").mkdir()
    for i, doc in enumerate(stdlib_texts()):
        (root / "corpus" / f"doc{i:02d}.txt").write_text(doc)
    return root


@pytest.fixture(scope="module")
def preprocessed(corpus_root) -> Path:
    """One preprocessed run directory; tests copy it so each trains in its own."""
    recipe = make_recipe(corpus_root / "base")
    execute("preprocess", recipe, prepare_run_dir(recipe))
    return Path(recipe.run_dir)


def fresh_run(preprocessed: Path, corpus_root: Path, name: str, **sections) -> tuple[Recipe, RunDir]:
    root = corpus_root / name
    shutil.copytree(preprocessed, root / "run")
    recipe = make_recipe(root, **sections)
    return recipe, prepare_run_dir(recipe)


def metrics(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines()]


def step_losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fastserve_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def write_recipe(recipe: Recipe, path: Path) -> Path:
    path.write_text(dump_recipe(recipe))
    return path


# ------------------------------------------------------------------ basic run


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_train_writes_model_transformers_loads(preprocessed, corpus_root, architecture):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, run = fresh_run(
        preprocessed,
        corpus_root,
        f"basic-{architecture}",
        model={"architecture": architecture, "size": "tiny"},
        train={"save_total_limit": 1},
    )
    result = execute("train", recipe, run)

    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    assert model.config.model_type == architecture
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|endoftext|>"
    assert (run.model_dir / "model.safetensors").is_file() and (run.model_dir / "generation_config.json").is_file()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")  # a reply ends at EOS or at the end of turn
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, end_of_turn]
    ids = tokenizer("def f(x):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4

    records = metrics(run)
    train_rows = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all({"lr", "grad_norm", "tokens"} <= set(r) for r in train_rows)
    assert all(r["tokens_per_s"] > 0 for r in train_rows[1:])
    evals = [r for r in records if "eval_perplexity" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["eval_loss"] < train_rows[0]["loss"]  # it learned something in 8 steps
    assert run.loss_plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = run.samples_path.read_text()
    assert [line for line in samples.splitlines() if line.startswith("### prompt")] == [
        "### prompt: 'import'",
        "### prompt: 'def'",
        "### prompt: 'class'",
    ]
    assert "samples.txt" in result.outputs
    assert [p.name for p in sorted(run.checkpoints_dir.iterdir())] == ["step-8"]  # save_total_limit=1
    assert result.metrics["steps"] == 8 and result.metrics["eval_perplexity"] == pytest.approx(
        evals[-1]["eval_perplexity"]
    )
    assert run.stage("train")["status"] == "done"


def test_bf16_mixed_precision_tracks_fp32(preprocessed, corpus_root):
    """train.mixed_precision bf16 (autocast + the fused loss in bf16): losses within 1% of fp32 and fp32 weights
    saved; a one-line error on CPUs without native bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve_cli.models.precision import cpu_supports_bf16

    recipe, run = fresh_run(preprocessed, corpus_root, "bf16", train={"mixed_precision": "bf16"})
    if not cpu_supports_bf16() and not torch.cuda.is_available():
        with pytest.raises(UserError, match="train.mixed_precision bf16"):
            execute("train", recipe, run)
        return
    execute("train", recipe, run)
    ref_recipe, ref_run = fresh_run(preprocessed, corpus_root, "bf16-ref")
    execute("train", ref_recipe, ref_run)
    ours, ref = step_losses(run), step_losses(ref_run)
    assert ours.keys() == ref.keys()
    for step in ours:
        assert ours[step] == pytest.approx(ref[step], rel=0.01), step
    evals = [r["eval_loss"] for r in metrics(run) if "eval_loss" in r]
    ref_evals = [r["eval_loss"] for r in metrics(ref_run) if "eval_loss" in r]
    assert evals == pytest.approx(ref_evals, rel=0.01)
    assert ours != ref  # it did run in bf16
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    assert next(model.parameters()).dtype == torch.float32


def test_lr_schedule_warmup_then_cosine(preprocessed, corpus_root):
    recipe, run = fresh_run(
        preprocessed, corpus_root, "schedule", train={"max_steps": 6, "warmup_steps": 2, "eval_steps": 6}
    )
    execute("train", recipe, run)
    lrs = [r["lr"] for r in metrics(run) if "lr" in r]
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # cosine decay after warmup


def test_early_stopping_on_validation_loss(preprocessed, corpus_root):
    # A learning rate of 3.0 blows the model up, so validation loss stops improving at once.
    recipe, run = fresh_run(
        preprocessed,
        corpus_root,
        "early",
        train={
            "max_steps": 30,
            "eval_steps": 1,
            "early_stopping_patience": 2,
            "learning_rate": 3.0,
            "warmup_steps": 0,
            "max_grad_norm": 0,
        },
    )
    result = execute("train", recipe, run)
    assert result.metrics["early_stopped"] is True
    assert result.metrics["steps"] < 30
    assert (run.model_dir / "model.safetensors").is_file()


# ------------------------------------------------------------------ resume


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses(preprocessed, corpus_root):
    """A run killed with SIGKILL mid-training and resumed logs the same per-step losses (1e-6)."""
    steps = 40
    train = {"max_steps": steps, "save_steps": 5, "eval_steps": 100, "save_total_limit": 3}
    ref_recipe, ref_run = fresh_run(preprocessed, corpus_root, "reference", train=train)
    recipe, run = fresh_run(preprocessed, corpus_root, "killed", train=train)
    path = write_recipe(recipe, corpus_root / "killed" / "recipe.yaml")

    proc = cli("train", str(path))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run.checkpoints_dir / "step-10").is_dir():
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training finished before it could be killed:\n{proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not run.model_dir.exists()
    killed_at = max(step_losses(run))

    resumed = cli("train", str(path))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err

    reference = cli("train", str(write_recipe(ref_recipe, corpus_root / "reference" / "recipe.yaml")))
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-3000:]

    got, want = step_losses(run), step_losses(ref_run)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step], killed_at)
    assert run.stage("train")["metrics"]["resumed_from_step"] >= 10


def test_sigterm_checkpoints_and_exits_cleanly(preprocessed, corpus_root):
    recipe, run = fresh_run(
        preprocessed, corpus_root, "sigterm", train={"max_steps": 100000, "save_steps": 100000, "eval_steps": 100000}
    )
    path = write_recipe(recipe, corpus_root / "sigterm" / "recipe.yaml")
    proc = cli("train", str(path))
    deadline = time.time() + 120
    while time.time() < deadline and not (
        run.metrics_path.is_file() and len(run.metrics_path.read_text().splitlines()) >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "checkpoint saved" in err
    (saved,) = list(run.checkpoints_dir.iterdir())
    state = json.loads((saved / "trainer_state.json").read_text())
    assert saved.name == f"step-{state['step']}" and state["step"] >= 3
    assert run.stage("train")["status"] == "failed"


def test_corrupt_checkpoint_falls_back_to_previous(preprocessed, corpus_root, capsys):
    recipe, run = fresh_run(
        preprocessed,
        corpus_root,
        "corrupt",
        train={"max_steps": 6, "save_steps": 2, "eval_steps": 100, "save_total_limit": 3},
    )
    execute("train", recipe, run)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-2", "step-4", "step-6"]
    weights = run.checkpoints_dir / "step-6" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-100:] = bytes(100)
    weights.write_bytes(bytes(blob))

    capsys.readouterr()
    recipe.train.max_steps = 8
    result = execute("train", recipe, run)
    err = capsys.readouterr().err
    assert "step-6 is corrupt" in err and "falling back" in err
    assert result.metrics["resumed_from_step"] == 4
    assert result.metrics["steps"] == 8


# ------------------------------------------------------------------ pretrained and LoRA


@pytest.fixture(scope="module")
def pretrained_run(corpus_root, tiny_gpt2_dir) -> Path:
    """Data preprocessed with the pretrained model's own tokenizer."""
    recipe = make_recipe(corpus_root / "pretrained-base", tokenizer={"path": str(tiny_gpt2_dir)})
    execute("preprocess", recipe, prepare_run_dir(recipe))
    return Path(recipe.run_dir)


def test_lora_finetune_merges_into_plain_model(pretrained_run, corpus_root, tiny_gpt2_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = corpus_root / "lora"
    shutil.copytree(pretrained_run, root / "run")
    recipe = make_recipe(
        root,
        tokenizer={"path": str(tiny_gpt2_dir)},
        model={"pretrained": str(tiny_gpt2_dir)},
        train={"max_steps": 4, "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    )
    run = prepare_run_dir(recipe)
    result = execute("train", recipe, run)
    assert result.metrics["trainable_parameters"] < result.metrics["parameters"] / 5

    weights = load_file(str(run.model_dir / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "base_model" in k]
    merged = AutoModelForCausalLM.from_pretrained(run.model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any("c_attn" in n for n in changed)
    assert not any("wte" in n or "ln_" in n for n in changed)  # only LoRA-targeted matrices moved
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    assert merged.generation_config.eos_token_id == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]


def test_pretrained_bad_directories(preprocessed, corpus_root, tiny_gpt2_dir, tmp_path):
    recipe, run = fresh_run(preprocessed, corpus_root, "bad-pretrained")
    recipe.model.pretrained = str(tmp_path / "nope")
    with pytest.raises(UserError, match="directory not found"):
        execute("train", recipe, run)
    (tmp_path / "empty").mkdir()
    shutil.copy(tiny_gpt2_dir / "config.json", tmp_path / "empty" / "config.json")
    recipe.model.pretrained = str(tmp_path / "empty")
    with pytest.raises(UserError, match="no weights"):
        execute("train", recipe, run)
    recipe.model.pretrained = str(tiny_gpt2_dir)  # its tokenizer is not the one this run's data used
    with pytest.raises(UserError, match="preprocess with tokenizer.path"):
        execute("train", recipe, run)
    recipe.model.pretrained = None
    recipe.train.lora = {"r": 4}
    with pytest.raises(UserError, match="LoRA fine-tunes a pretrained model"):
        execute("train", recipe, run)


def test_train_before_preprocess_is_one_line_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ndata: {paths: [corpus]}\n")
    proc = cli("train", str(path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "run `fastserve preprocess` first" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ distributed (slow)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(preprocessed, corpus_root):
    """--num-processes 2 (gloo DDP, batch 2 each) follows the 1-process batch-4 run step for step."""
    one_recipe, one = fresh_run(preprocessed, corpus_root, "ddp1", train={"max_steps": 5, "eval_steps": 5})
    two_recipe, two = fresh_run(
        preprocessed, corpus_root, "ddp2", train={"max_steps": 5, "eval_steps": 5, "per_device_train_batch_size": 2}
    )
    execute("train", one_recipe, one)
    proc = cli(
        "train", str(write_recipe(two_recipe, corpus_root / "ddp2" / "recipe.yaml")), "--num-processes", "2", "--json"
    )
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out)["metrics"]["processes"] == 2
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4)
    assert two.stage("train")["status"] == "done"


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu_one_and_two_processes(preprocessed, corpus_root):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'fastserve[deepspeed]')")
    from transformers import AutoModelForCausalLM

    ds = {"max_steps": 4, "eval_steps": 4, "save_steps": 2, "deepspeed": {"stage": 2}}
    plain_recipe, plain = fresh_run(preprocessed, corpus_root, "ds-plain", train={"max_steps": 4, "eval_steps": 4})
    one_recipe, one = fresh_run(preprocessed, corpus_root, "ds1", train=ds)
    two_recipe, two = fresh_run(preprocessed, corpus_root, "ds2", train={**ds, "per_device_train_batch_size": 2})
    execute("train", plain_recipe, plain)
    execute("train", one_recipe, one)  # through accelerate's DeepSpeed plugin, one process
    proc = cli("train", str(write_recipe(two_recipe, corpus_root / "ds2" / "recipe.yaml")), "--num-processes", "2")
    _, err = proc.communicate(timeout=500)
    assert proc.returncode == 0, err[-3000:]
    reference = step_losses(plain)
    for run in (one, two):
        losses = step_losses(run)
        assert sorted(losses) == [1, 2, 3, 4]
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, abs=1e-3)
        assert (run.checkpoints_dir / "step-4" / "deepspeed").is_dir()
        AutoModelForCausalLM.from_pretrained(run.model_dir)
