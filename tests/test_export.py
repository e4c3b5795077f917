"""Export stage: real torch.onnx export of tiny models, run through real onnxruntime, parity enforced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.testing.models import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def write_validation_data(run, tokenizer_dir: Path, blocks: int = 12, block_size: int = 32) -> None:
    """A small DatasetDict of packed stdlib text, as the preprocess stage would write it."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from fastserve_cli.testing.corpus import stdlib_texts

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [t for text in stdlib_texts() for t in tokenizer(text)["input_ids"]][: blocks * 2 * block_size]
    rows = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]

    def split(part):
        return Dataset.from_dict({"input_ids": part, "attention_mask": [[1] * block_size] * len(part), "labels": part})

    DatasetDict({"train": split(rows[blocks:]), "validation": split(rows[:blocks])}).save_to_disk(run.data_dir)


def make_run(
    tmp_path: Path,
    tokenizer_dir: Path,
    arch: str = "gpt2",
    export: dict | None = None,
    train_done: bool = True,
    data: bool = False,
):
    """A run directory as preprocess + train would leave it (tiny random model, stages marked done)."""
    import yaml

    from fastserve_cli.core.pipeline import prepare_run_dir
    from fastserve_cli.core.recipe import load_recipe

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({"name": "t", "run_dir": str(tmp_path / "run"), "export": export or {}}))
    recipe = load_recipe(recipe_path)
    run = prepare_run_dir(recipe)
    run.update_stage("preprocess", status="done", run_id="p")
    if train_done:
        make_tiny_model(arch, tokenizer_dir, run.model_dir)
        run.update_stage("train", status="done", run_id="t")
    if data:
        write_validation_data(run, tokenizer_dir)
    return recipe, run


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastserve_cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


# ---------------------------------------------------------------- the graph contract


def test_export_onnx_contract(tiny_model_dir, tmp_path):
    """One graph, optimum names, dynamic axes, empty-past first step, exact parity, self-contained dir."""
    import onnx
    from transformers import AutoConfig, AutoTokenizer

    from fastserve_cli.export.onnx_graph import export_onnx
    from fastserve_cli.models.onnx import OnnxCausalLM

    out = tmp_path / "onnx"
    parity = export_onnx(tiny_model_dir, out, opset=17, parity_steps=32)
    assert parity["passed"], parity
    assert parity["max_abs_diff"] < 1e-4
    assert [c["batch"] for c in parity["cases"]] == [1, 4] and parity["cases"][1]["padded"]
    assert all(c["tokens_identical"] and c["steps"] == 32 for c in parity["cases"])
    assert sorted(p.name for p in out.glob("*.onnx*")) == ["model.onnx"]

    config = AutoConfig.from_pretrained(out)
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert outputs == ["logits", *[f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]]
    dims = [d.dim_param or d.dim_value for d in graph.input[3].type.tensor_type.shape.dim]
    assert dims == ["batch_size", kv_heads, "past_sequence_length", head_dim]

    session = OnnxCausalLM(out)
    ids = np.array([[5, 6, 7, 8, 9]])
    logits, present = session.step(ids, np.ones_like(ids), np.arange(5)[None])  # empty past
    assert logits.shape == (1, 5, config.vocab_size)
    assert len(present) == 2 * layers and present[0].shape == (1, kv_heads, 5, head_dim)
    logits2, present2 = session.step(np.array([[3]]), np.ones((1, 6)), np.array([[5]]), present)
    assert logits2.shape == (1, 1, config.vocab_size) and present2[0].shape[2] == 6

    last = OnnxCausalLM(out, last_logits_only=True)  # what the server runs: the head on the last position only
    assert last.last_logits_only
    last_logits, last_present = last.step(ids, np.ones_like(ids), np.arange(5)[None])
    assert last_logits.shape == (1, 1, config.vocab_size)
    np.testing.assert_allclose(last_logits[:, 0], logits[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last_present[0], present[0], rtol=1e-6, atol=1e-6)

    tokenizer = AutoTokenizer.from_pretrained(out)  # tokenizer and configs travel with the graph
    assert tokenizer.eos_token == "<|endoftext|>"
    assert (out / "generation_config.json").is_file()


def test_external_data_and_opset(tiny_gpt2_dir, tmp_path):
    """Weights can live in model.onnx.data (automatic above 2 GB; forced here) and the opset is honoured."""
    import onnx

    from fastserve_cli.export.onnx_graph import export_onnx
    from fastserve_cli.models.onnx import OnnxCausalLM

    out = tmp_path / "onnx"
    parity = export_onnx(tiny_gpt2_dir, out, opset=18, external_data=True, parity_steps=4)
    assert parity["passed"], parity
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 18
    tokens, _ = OnnxCausalLM(out).generate_greedy(np.array([[1, 2, 3]]), np.ones((1, 3)), 3)
    assert tokens.shape == (1, 3)


def test_onnx_greedy_matches_transformers_generate(tiny_gpt2_dir, tmp_path):
    """The exported graph decodes exactly what `model.generate` (default attention) produces."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve_cli.export.onnx_graph import export_onnx
    from fastserve_cli.models.onnx import OnnxCausalLM

    out = tmp_path / "onnx"
    assert export_onnx(tiny_gpt2_dir, out, parity_steps=2)["passed"]
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    prompt = torch.tensor([[11, 22, 33, 44, 55, 66]])
    expected = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False, min_new_tokens=20
    )[0, prompt.shape[1] :].numpy()
    tokens, _ = OnnxCausalLM(out).generate_greedy(prompt.numpy(), np.ones_like(prompt.numpy()), 20)
    assert tokens[0].tolist() == expected.tolist()


# ---------------------------------------------------------------- the stage


@pytest.mark.slow
def test_export_stage_via_cli(tmp_path, tiny_tokenizer_dir):
    """`fastserve export RUN_DIR --set export.optimize=true`: manifest done, parity.json, fused graph."""
    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, "llama")
    result = cli("export", str(run.root), "--set", "export.optimize=true", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["metrics"]["parity_passed"] and printed["metrics"]["optimized"]
    assert "onnx/model.onnx" in printed["outputs"] and "onnx/tokenizer.json" in printed["outputs"]
    parity = json.loads(run.parity_path.read_text())
    assert parity["passed"] and parity["optimized"] and parity["unoptimized"]["passed"]
    assert parity["fused_operators"].get("SkipSimplifiedLayerNormalization", 0) > 0
    assert parity["source"] == "model" and parity["model_type"] == "llama"
    assert run.stage("export")["status"] == "done"
    assert not any(p.name.startswith(".onnx") for p in run.root.iterdir())  # no staging leftovers


def test_parity_failure_fails_stage_and_keeps_previous_export(tmp_path, tiny_tokenizer_dir):
    """Out of tolerance -> exit 2, one line, results in onnx.parity-failed.json, the old onnx/ untouched."""
    from fastserve_cli.core.pipeline import execute

    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, "gpt2", export={"parity_steps": 4})
    execute("export", recipe, run)
    before = (run.onnx_dir / "model.onnx").read_bytes()
    result = cli("export", str(run.root), "--set", "export.parity_atol=1e-12", "--set", "export.parity_steps=4")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "parity failed" in result.stderr and "Traceback" not in result.stderr
    failed = json.loads(run.parity_failed_path.read_text())
    assert failed["passed"] is False and failed["max_abs_diff"] > 1e-12
    assert (run.onnx_dir / "model.onnx").read_bytes() == before
    assert json.loads(run.parity_path.read_text())["passed"]
    assert run.stage("export")["status"] == "failed"
    assert not any(p.name.startswith(".onnx") for p in run.root.iterdir())


def test_export_before_train(tmp_path, tiny_tokenizer_dir):
    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, train_done=False)
    result = cli("export", str(run.root))
    assert result.returncode == 2 and "train" in result.stderr and result.stderr.count("\n") == 1
    assert not run.onnx_dir.exists()


def test_unsupported_architecture(tmp_path, tiny_tokenizer_dir):
    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, train_done=False)
    run.model_dir.mkdir()
    (run.model_dir / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    run.update_stage("train", status="done", run_id="t")
    result = cli("export", str(run.root))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "'gpt_neox' is not supported" in result.stderr and "gpt2, llama" in result.stderr
    assert not run.onnx_dir.exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output(tmp_path, tiny_tokenizer_dir):
    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, "gpt2")
    run.onnx_dir.mkdir()
    run.onnx_dir.chmod(0o555)
    try:
        result = cli("export", str(run.root))
    finally:
        run.onnx_dir.chmod(0o755)
    assert result.returncode == 2 and "not writable" in result.stderr and result.stderr.count("\n") == 1
    assert list(run.onnx_dir.iterdir()) == []


def test_unknown_source_variant(tmp_path, tiny_tokenizer_dir):
    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, "gpt2")
    run.update_stage("optimize", status="done", run_id="o")
    result = cli("export", str(run.root), "--set", "export.source=pruned")
    assert result.returncode == 2 and "export.source 'pruned'" in result.stderr
    assert not run.onnx_dir.exists()


# ---------------------------------------------------------------- quantized variants


def test_quantized_variants_rows_and_drift(tmp_path, tiny_tokenizer_dir):
    """dynamic/static int8 and int4 graphs: same I/O contract, smaller, perplexity near fp32, report rows."""
    import onnx

    from fastserve_cli.core.pipeline import execute
    from fastserve_cli.models.onnx import OnnxCausalLM

    export = {"quantize": ["dynamic_int8", "static_int8", "int4"], "parity_steps": 8, "calibration_blocks": 2}
    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, "llama", export=export, data=True)
    recipe.optimize.eval_blocks, recipe.optimize.latency_prompt_tokens = 4, 8
    recipe.optimize.latency_new_tokens, recipe.optimize.latency_repeats = 4, 1
    recipe.gates.max_perplexity_increase = 0.05
    result = execute("export", recipe, run)
    report = json.loads(run.report_path.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"baseline", "onnx_fp32", "onnx_dynamic_int8", "onnx_static_int8", "onnx_int4"}
    fp32 = rows["onnx_fp32"]
    assert abs(fp32["ratios"]["perplexity"] - 1) < 1e-4  # same weights as the PyTorch baseline, same blocks
    fp32_inputs = [i.name for i in onnx.load(str(run.onnx_dir / "model.onnx")).graph.input]
    for name, file in [
        ("dynamic_int8", "model_dynamic_int8.onnx"),
        ("static_int8", "model_static_int8.onnx"),
        ("int4", "model_int4.onnx"),
    ]:
        row = rows[f"onnx_{name}"]
        assert row["backend"] == "onnx" and row["method"] == f"onnx_{name}" and row["path"] == f"onnx/{file}"
        assert row["size_bytes"] < fp32["size_bytes"] and row["ratios"]["size"] < 1
        assert abs(row["perplexity"] / fp32["perplexity"] - 1) < 0.05, (name, row["perplexity"], fp32["perplexity"])
        assert row["gates"]["passed"] and row["decode_ms_per_token"] > 0 and row["tokens_per_s"] > 0
        graph = onnx.load(str(run.onnx_dir / file)).graph
        assert [i.name for i in graph.input] == fp32_inputs
        tokens, _ = OnnxCausalLM(run.onnx_dir / file).generate_greedy(np.array([[4, 5, 6]]), np.ones((1, 3)), 3)
        assert tokens.shape == (1, 3)
        full, _ = OnnxCausalLM(run.onnx_dir / file).step(np.array([[4, 5, 6]]), np.ones((1, 3)), np.arange(3)[None])
        sliced = OnnxCausalLM(run.onnx_dir / file, last_logits_only=True)
        assert sliced.last_logits_only, name  # the quantized heads are recognised too
        last, _ = sliced.step(np.array([[4, 5, 6]]), np.ones((1, 3)), np.arange(3)[None])
        np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-4, atol=1e-4)
    ops = {n.op_type for n in onnx.load(str(run.onnx_dir / "model_int4.onnx")).graph.node}
    assert "MatMulNBits" in ops
    ops = {n.op_type for n in onnx.load(str(run.onnx_dir / "model_static_int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    parity = json.loads(run.parity_path.read_text())
    assert parity["passed"] and set(parity["variants"]) == {"dynamic_int8", "static_int8", "int4"}
    assert result.metrics["onnx_int4_size_bytes"] == rows["onnx_int4"]["size_bytes"]

    # A broken gate fails the stage but keeps the verified onnx/ and the measured rows.
    recipe.export.quantize = ["dynamic_int8"]
    recipe.gates.max_size_ratio = 0.01
    with pytest.raises(UserError, match="gates.max_size_ratio"):
        execute("export", recipe, run)
    assert run.stage("export")["status"] == "failed"
    assert (run.onnx_dir / "model_dynamic_int8.onnx").is_file() and not (run.onnx_dir / "model_int4.onnx").exists()
    rows = {r["name"]: r for r in json.loads(run.report_path.read_text())["rows"]}
    assert not rows["onnx_dynamic_int8"]["gates"]["passed"]
    assert "onnx_int4" not in rows and "onnx_static_int8" not in rows  # their graphs are gone


# ---------------------------------------------------------------- other sources and families


def test_head_pruned_variant_source(tmp_path, tiny_tokenizer_dir):
    """export.source = a structured (head-pruned) GPT-2 variant: KV shapes follow the pruned model, parity holds."""
    from fastserve_cli.core.pipeline import execute
    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.optimize.pruning import plan_structured, prune_structured, weight_importance

    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, "gpt2", export={"source": "heads", "parity_steps": 8})
    recipe.optimize.variants = [{"name": "heads", "method": "structured", "heads_fraction": 0.25}]
    model = load_causal_lm(run.model_dir)
    heads, neurons = weight_importance(model)
    prune_structured(model, plan_structured(model, 0.25, None, None), heads, neurons)
    model.save_pretrained(run.variant_dir("heads"))
    run.update_stage("optimize", status="done", run_id="o")
    execute("export", recipe, run)
    parity = json.loads(run.parity_path.read_text())
    assert parity["passed"] and parity["source"] == "heads"
    from fastserve_cli.models.onnx import OnnxCausalLM

    assert OnnxCausalLM(run.onnx_dir).num_kv_heads == 3  # 4 heads, a quarter removed


def test_torch_quantized_variant_is_refused(tmp_path, tiny_tokenizer_dir):
    from fastserve_cli.core.pipeline import execute

    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, "gpt2", export={"source": "int8"})
    recipe.optimize.variants = [{"name": "int8", "method": "dynamic_int8"}]
    run.variant_dir("int8").mkdir(parents=True)
    config = json.loads((run.model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fastserve", "scheme": "dynamic_int8", "modules": []}
    (run.variant_dir("int8") / "config.json").write_text(json.dumps(config))
    run.update_stage("optimize", status="done", run_id="o")
    with pytest.raises(UserError, match="quantized PyTorch model cannot be exported"):
        execute("export", recipe, run)
    assert not run.onnx_dir.exists()


def test_qwen2_export_parity(tmp_path):
    """The Llama-family wrapper covers qwen2 (q/k/v biases) as well."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastserve_cli.export.onnx_graph import export_onnx

    config = Qwen2Config(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    parity = export_onnx(tmp_path / "model", tmp_path / "onnx", parity_steps=16)
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4, parity
