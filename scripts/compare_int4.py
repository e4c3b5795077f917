"""Perplexity of round-to-nearest int4 vs GPTQ int4 (same format, same group size) on a trained run.

    .venv/bin/python scripts/compare_int4.py RUN_DIR [--groups 32 128] [--eval-blocks 64] [--calibration-blocks 64]

Quality only (no timing, so no bench lock): loads RUN_DIR/model, quantizes every linear (lm_head too) each
way in memory, and prints validation perplexity (the first N blocks, as the optimize report) and the
increase over fp32; GPTQ calibrates on the last N validation blocks, as `method: gptq` does.
"""

from __future__ import annotations

import argparse
import copy
import json


def main() -> None:
    import torch

    from fastserve_cli.core.rundir import RunDir
    from fastserve_cli.models.loader import load_causal_lm
    from fastserve_cli.models.measure import _block, _validation_split, calibration_blocks, torch_perplexity
    from fastserve_cli.models.quantized import quantize_model
    from fastserve_cli.optimize.gptq import gptq_model

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--calibration-blocks", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    run = RunDir(args.run_dir)
    split = _validation_split(run)
    blocks = [_block(split[i]) for i in range(min(args.eval_blocks, len(split)))]
    calib = [{k: torch.tensor([v]) for k, v in b.items()} for b in calibration_blocks(run, args.calibration_blocks)]
    base = load_causal_lm(run.model_dir)
    fp32 = torch_perplexity(base, blocks)
    result = {
        "fp32": round(fp32, 4),
        "validation_blocks": len(split),
        "eval_blocks": len(blocks),
        "calibration_blocks": len(calib),
    }
    for group in args.groups:
        rtn = copy.deepcopy(base)
        quantize_model(rtn, "weight_only_int4", group)
        gptq = copy.deepcopy(base)
        gptq_model(gptq, calib, group)
        for name, model in (("rtn", rtn), ("gptq", gptq)):
            ppl = torch_perplexity(model, blocks)
            result[f"{name}_g{group}"] = {
                "perplexity": round(ppl, 4),
                "increase": round(ppl - fp32, 4),
                "increase_pct": round(100 * (ppl / fp32 - 1), 2),
            }
        result[f"gptq_over_rtn_increase_g{group}"] = round(
            result[f"gptq_g{group}"]["increase"] / max(result[f"rtn_g{group}"]["increase"], 1e-9), 3
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
