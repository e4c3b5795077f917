"""export.source = a gptq (weight-only int4) variant: the ONNX int4 graph re-emits the variant's own int4
weights and scales (MatMulNBits) instead of re-quantizing the fp32 graph, so export and optimize agree."""

from __future__ import annotations

import pytest
from test_export import make_run


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int4_graph_takes_the_gptq_weights(tmp_path, tiny_tokenizer_dir, arch):
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from fastserve_cli.core.pipeline import execute
    from fastserve_cli.core.recipe import VariantConfig
    from fastserve_cli.models.int4_dense import write_dense_copy
    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.models.quantized import save_quantized
    from fastserve_cli.optimize.gptq import gptq_model

    export = {"quantize": ["int4"], "parity_steps": 8, "calibration_blocks": 2, "source": "g4"}
    recipe, run = make_run(tmp_path, tiny_tokenizer_dir, arch, export=export, data=True)
    recipe.optimize.variants = [VariantConfig(name="g4", method="gptq", group_size=32)]
    recipe.optimize.eval_blocks, recipe.optimize.latency_prompt_tokens = 4, 8
    recipe.optimize.latency_new_tokens, recipe.optimize.latency_repeats = 4, 1
    model = load_causal_lm(run.model_dir)
    batches = [
        {"input_ids": torch.randint(0, 400, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)
    ]
    modules = gptq_model(model, batches, 32)
    out = run.variant_dir("g4")
    out.mkdir(parents=True)
    save_quantized(model, "weight_only_int4", modules, run.model_dir, out, {"group_size": 32, "method": "gptq"})
    run.update_stage("optimize", status="done", run_id="o")

    execute("export", recipe, run)
    import json

    parity = json.loads(run.parity_path.read_text())
    assert parity["passed"] and parity["source"] == "g4"
    check = parity["variants"]["int4"]
    assert check["block_size"] == 32

    # Every MatMulNBits weight decodes to exactly the variant's int4 values.
    exact = write_dense_copy(out, tmp_path / "dense")
    wanted = {(q.shape, float(np.abs(s).sum())): (q, s) for q, s, _ in exact.values()}
    graph = onnx.load(str(run.onnx_dir / "model_int4.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    # GPT-2's Conv1D layers export as Gemm, which onnxruntime's MatMulNBits quantizer leaves alone (as
    # without a source): only its lm_head becomes MatMulNBits. Llama: every linear.
    assert len(nodes) == (len(modules) if arch == "llama" else 1) == check["weights_from_source"]
    for node in nodes:
        packed, scales = numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[2]])
        q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
        scales = scales.reshape(packed.shape[0], -1)
        q_ref, s_ref = wanted[(q.shape, float(np.abs(scales).sum()))]
        assert np.array_equal(q, q_ref) and np.array_equal(scales, s_ref)
