"""Stock transformers vs fastserve's loader on the same quantized variants of a trained run's model.

    .venv/bin/python scripts/compare_ct_loaders.py RUN_DIR [--prompts 16] [--new-tokens 32] [--group 128]

Quality only (no timing, so no bench lock). Quantizes RUN_DIR/model with each scheme and with GPTQ (calibrated
on the last validation blocks, as `method: gptq` does), saves each variant as optimize does (compressed-tensors;
a GPT-2 as its OPT equivalent), then loads every directory twice: `AutoModelForCausalLM.from_pretrained` (stock
transformers + compressed-tensors) and `load_causal_lm` (our int8/int4 CPU kernels). Prints, per variant, the
fraction of prompts whose greedy continuations are identical and the first position where they part, for
our kernels (bf16 matmuls for weight-only int8/int4, fbgemm per-tensor activations for W8A8) and for our
loaded weights dequantized into fp32 nn.Linear layers (stock's arithmetic: this isolates the file format).
Prompts are the first tokens of validation blocks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def dequantized(model):
    """The model with every quantized linear replaced by an fp32 nn.Linear holding q * scale: our file's
    weights with stock transformers' arithmetic, which isolates the format from our kernels' rounding."""
    import torch
    from torch import nn

    from fastserve_cli.models.quant_linear import QuantLinear, WeightOnlyInt4Linear

    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        if isinstance(module, WeightOnlyInt4Linear):
            q = torch.stack([module.weight >> 4, module.weight & 0xF], -1).reshape(module.out_features, -1)
            groups = (q.float() - 8).reshape(module.out_features, -1, module.group_size)
            weight = (groups * module.weight_scale.float()[..., None]).reshape(module.out_features, -1)
        else:
            weight = module.weight.float() * module.weight_scale.float()[:, None]
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        dense.weight.data.copy_(weight)
        if module.bias is not None:
            dense.bias.data.copy_(module.bias)
        model.set_submodule(name, dense)
    return model


def agreement(a_model, b_model, prompts, new_tokens: int) -> tuple[str, list[int]]:
    """How many prompts get identical greedy continuations, and where the others first differ."""
    import torch

    same, first_diff = 0, []
    for prompt in prompts:
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        a, b = a_model.generate(prompt, **kwargs), b_model.generate(prompt, **kwargs)
        if torch.equal(a, b):
            same += 1
        else:
            first_diff.append(int((a[0] != b[0]).nonzero()[0]) - prompt.shape[1])
    return f"{same}/{len(prompts)}", first_diff


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve_cli.core.rundir import RunDir
    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.models.measure import _validation_split, calibration_blocks
    from fastserve_cli.models.quantized import SCHEMES, quantize_model, save_quantized
    from fastserve_cli.optimize.gptq import gptq_model

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    run = RunDir(args.run_dir)
    split = _validation_split(run)
    prompts = [torch.tensor([split[i]["input_ids"][: args.prompt_tokens]]) for i in range(args.prompts)]
    calib = [{"input_ids": torch.tensor([b["input_ids"]])} for b in calibration_blocks(run, 64)]
    result = {"model_type": load_causal_lm(run.model_dir).config.model_type, "prompts": len(prompts)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (*SCHEMES, "gptq"):
            model = load_causal_lm(run.model_dir)
            if name == "gptq":
                modules, scheme = gptq_model(model, calib, args.group), "weight_only_int4"
            else:
                modules, scheme = quantize_model(model, name, args.group), name
            out = Path(tmp) / name
            out.mkdir()
            save_quantized(model, scheme, modules, run.model_dir, out, {"group_size": args.group})
            saved_as = json.loads((out / "config.json").read_text())["model_type"]
            ours = load_causal_lm(out)
            stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            kernels, kernels_diff = agreement(ours, stock, prompts, args.new_tokens)
            dense, dense_diff = agreement(dequantized(load_causal_lm(out)), stock, prompts, args.new_tokens)
            result[name] = {
                "saved_as": saved_as,
                "stock_class": type(stock).__name__,
                "identical_greedy_our_kernels": kernels,
                "first_differing_new_token": kernels_diff,
                "identical_greedy_our_weights_fp32": dense,
                "first_differing_new_token_fp32": dense_diff,
            }
            print(name, json.dumps(result[name]), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
