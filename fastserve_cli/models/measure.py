"""One measurement module for every stage: perplexity and decode latency of torch and ONNX models.

Definitions, so any backend can reproduce them:
- perplexity: the first `optimize.eval_blocks` rows of the validation split (`validation_blocks`); each
  block is run whole, position t predicts labels[t+1], labels == -100 are skipped; perplexity =
  exp(total NLL / number of predicted tokens) over all blocks (`nll_sum` on the logits).
- decode latency: batch 1, greedy, KV cache. The prompt is the first `optimize.latency_prompt_tokens`
  tokens of the validation split (`latency_prompt`); after the prefill, `optimize.latency_new_tokens - 1`
  single-token decode steps are timed one by one (EOS ignored). A run's figure is its median step time
  (the median keeps a shared CPU's scheduling hiccups out); decode_ms_per_token is the lowest run figure
  over `optimize.latency_repeats` runs after one warm-up run. Models measured together are timed in
  interleaved rounds (one run of each per round), so a load change on a shared machine hits them alike.
  Torch models and ONNX sessions use the same statistic (`decode_run_ms` / `onnx_decode_run_ms`).
- size_bytes: bytes of the weight files of the variant (*.safetensors, *.onnx, external data); the
  tokenizer and configs are the same for every variant and are not counted.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fastserve_cli.core.batches import IGNORE_INDEX
from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import Recipe
from fastserve_cli.core.report import BASELINE, current_report, find_row, finish_report, make_row
from fastserve_cli.core.rundir import RunDir
from fastserve_cli.models.compat import cache_keyword, output_cache

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from torch import nn

    from fastserve_cli.models.onnx import OnnxCausalLM

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".data", ".bin")


# ------------------------------------------------------------------ measurement inputs


def _validation_split(run: RunDir):
    from datasets import load_from_disk

    if not run.data_dir.is_dir():
        raise UserError(f"{run.data_dir}: no preprocessed data here; run `fastserve preprocess` first")
    data = load_from_disk(str(run.data_dir))
    if "validation" not in data or len(data["validation"]) == 0:
        raise UserError(
            f"{run.data_dir}: the validation split is missing or empty; raise data.validation_fraction and re-run preprocess"
        )
    return data["validation"]


def _block(row: dict[str, Any]) -> dict[str, list[int]]:
    labels = row.get("labels") or list(row["input_ids"])
    mask = row.get("attention_mask") or [1] * len(row["input_ids"])
    return {"input_ids": list(row["input_ids"]), "labels": list(labels), "attention_mask": list(mask)}


def validation_blocks(run: RunDir, recipe: Recipe) -> list[dict[str, list[int]]]:
    """The blocks perplexity is measured on: the first `optimize.eval_blocks` validation rows."""
    split = _validation_split(run)
    return [_block(split[i]) for i in range(min(recipe.optimize.eval_blocks, len(split)))]


def calibration_blocks(run: RunDir, count: int) -> list[dict[str, list[int]]]:
    """Blocks for activation/gradient importance: the last `count` validation rows (away from the eval ones)."""
    split = _validation_split(run)
    return [_block(split[i]) for i in range(max(0, len(split) - count), len(split))]


def latency_prompt(run: RunDir, recipe: Recipe) -> list[int]:
    """The decode benchmark's prompt: the first `optimize.latency_prompt_tokens` validation tokens."""
    tokens: list[int] = []
    split = _validation_split(run)
    for i in range(len(split)):
        tokens += [t for t, m in zip(split[i]["input_ids"], _block(split[i])["attention_mask"]) if m]
        if len(tokens) >= recipe.optimize.latency_prompt_tokens:
            break
    return tokens[: recipe.optimize.latency_prompt_tokens]


def context_length(model_dir: Path) -> int | None:
    """The positions a model directory's config allows (GPT-2 n_positions, Llama max_position_embeddings)."""
    import json

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return config.get("n_positions") or config.get("max_position_embeddings")


def latency_workload(run: RunDir, recipe: Recipe) -> tuple[list[int], int]:
    """The decode benchmark's prompt and token count, cut to fit the trained model's context (a model trained
    with data.block_size 64 cannot decode 32 + 64 positions)."""
    prompt, new_tokens = latency_prompt(run, recipe), recipe.optimize.latency_new_tokens
    context = context_length(run.model_dir)
    if context is not None and len(prompt) + new_tokens > context:
        prompt = prompt[: min(len(prompt), context // 2)]
        new_tokens = max(2, min(new_tokens, context - len(prompt)))
    return prompt, new_tokens


# ------------------------------------------------------------------ perplexity


def nll_sum(logits: "torch.Tensor", labels: "torch.Tensor") -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens (labels -100 skipped)."""
    import torch.nn.functional as F

    shifted = labels[:, 1:]
    count = int((shifted != IGNORE_INDEX).sum())
    if count == 0:
        return 0.0, 0
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(loss), count


def torch_perplexity(model: "nn.Module", blocks: list[dict[str, list[int]]], batch_size: int = 4) -> float:
    """exp(mean NLL) over the blocks (batched when consecutive blocks have equal length)."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        i = 0
        while i < len(blocks):
            length = len(blocks[i]["input_ids"])
            batch = [blocks[i]]
            while (
                len(batch) < batch_size
                and i + len(batch) < len(blocks)
                and len(blocks[i + len(batch)]["input_ids"]) == length
            ):
                batch.append(blocks[i + len(batch)])
            i += len(batch)
            tensors = {k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
            nll, n = nll_sum(logits, tensors["labels"])
            total, count = total + nll, count + n
    if count == 0:
        raise UserError("optimize: the validation blocks have no tokens with labels; check the preprocess output")
    return math.exp(min(total / count, 700.0))


def onnx_perplexity(session: "OnnxCausalLM", blocks: list[dict[str, list[int]]]) -> float:
    """Validation perplexity of an ONNX session through `torch_perplexity` itself, so ONNX and PyTorch rows
    share one definition (batching, label masking, NLL): the session is adapted to `model(...).logits`."""
    from types import SimpleNamespace

    import torch

    from fastserve_cli.models.onnx import position_ids_from_mask

    def forward(input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> SimpleNamespace:
        mask = attention_mask.numpy()
        logits, _ = session.step(input_ids.numpy(), mask, position_ids_from_mask(mask))
        return SimpleNamespace(logits=torch.from_numpy(logits))

    return torch_perplexity(forward, blocks)


# ------------------------------------------------------------------ decode latency


def decode_run_ms(model: "nn.Module", prompt: list[int], new_tokens: int) -> float:
    """One greedy run at batch 1: prefill, then `new_tokens - 1` timed decode steps; the median step in ms."""
    import statistics

    import torch

    if len(prompt) == 0:
        raise UserError("optimize: no validation tokens for the latency prompt; check the preprocess output")
    ids = torch.as_tensor(prompt)
    ids = ids[None, :] if ids.dim() == 1 else ids  # a 2-D prompt ([batch, len], no padding) times batched decode
    cache_arg = cache_keyword(model)
    steps = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(max(1, new_tokens - 1)):
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{cache_arg: past})
            past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
    return statistics.median(steps) * 1000.0


def onnx_decode_run_ms(session: "OnnxCausalLM", prompt: list[int] | "np.ndarray", new_tokens: int) -> float:
    """`decode_run_ms` for an ONNX session: prefill, then timed single-token steps; the median step in ms.
    A 2-D `prompt` ([batch, len], no padding) times batched decode."""
    import numpy as np

    from fastserve_cli.models.onnx import position_ids_from_mask

    ids = np.asarray(prompt, np.int64)
    ids = ids[None, :] if ids.ndim == 1 else ids
    if ids.shape[1] == 0:
        raise UserError("optimize: no validation tokens for the latency prompt; check the preprocess output")
    batch, length = ids.shape
    mask = np.ones_like(ids)
    logits, past = session.step(ids, mask, position_ids_from_mask(mask))
    token = logits[:, -1].argmax(-1)[:, None]
    steps = []
    for i in range(max(1, new_tokens - 1)):
        start = time.perf_counter()
        mask = np.ones((batch, length + i + 1), np.int64)
        logits, past = session.step(token, mask, np.full((batch, 1), length + i, np.int64), past)
        token = logits[:, -1].argmax(-1)[:, None]
        steps.append(time.perf_counter() - start)
    return statistics.median(steps) * 1000.0


def decode_timer(model: Any) -> Callable[[list[int], int], float]:
    """The one-run timer for a torch model or an ONNX session."""
    from fastserve_cli.models.onnx import OnnxCausalLM

    if isinstance(model, OnnxCausalLM):
        return lambda prompt, new_tokens: onnx_decode_run_ms(model, prompt, new_tokens)
    return lambda prompt, new_tokens: decode_run_ms(model, prompt, new_tokens)


def torch_decode_ms(model: Any, prompt: list[int], new_tokens: int, repeats: int = 3) -> float:
    """ms per greedy decode step at batch 1 after the prefill (KV cache): the best over `repeats` runs
    (after one warm-up) of each run's median step time. Takes torch models and ONNX sessions."""
    return interleaved_decode_ms({"model": model}, prompt, new_tokens, repeats)["model"]


def interleaved_decode_ms(models: dict[str, Any], prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """`torch_decode_ms` of several models (torch or ONNX) in rounds (one run of each per round, after a
    warm-up of each), so a change of load on a shared CPU hits every model alike and the ratios stay fair."""
    timers = {name: decode_timer(model) for name, model in models.items()}
    for timer in timers.values():
        timer(prompt, new_tokens)
    best = {name: math.inf for name in models}
    for _ in range(repeats):
        for name, timer in timers.items():
            best[name] = min(best[name], timer(prompt, new_tokens))
    return best


def remeasure_latency(run: RunDir, recipe: Recipe, rows: list[dict[str, Any]]) -> None:
    """Re-time the torch rows' models together with `interleaved_decode_ms` and update the rows in place."""
    from fastserve_cli.models.loader import load_causal_lm

    models = {row["name"]: load_causal_lm(run.root / row["path"]) for row in rows if row["backend"] == "torch"}
    opt = recipe.optimize
    prompt, new_tokens = latency_workload(run, recipe)
    timings = interleaved_decode_ms(models, prompt, new_tokens, opt.latency_repeats)
    for row in rows:
        if row["name"] in timings:
            row["decode_ms_per_token"] = timings[row["name"]]
            row["tokens_per_s"] = 1000.0 / timings[row["name"]]
            row["details"]["latency"] = f"interleaved with {len(timings) - 1} other model(s)"


# ------------------------------------------------------------------ sizes


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files in a model directory (tokenizer and configs excluded)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES))


def parameter_count(model: "nn.Module") -> int:
    """Logical parameters: trainable tensors (shared ones once) plus the weights of quantized layers."""
    from fastserve_cli.models.quantized import QuantLinear

    count = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            count += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    return count


def linear_weight_bytes(model: "nn.Module") -> int:
    """Bytes the linear layers' weights (lm_head included) take in memory: fp32, int8 + scales, or int4."""
    from fastserve_cli.models.quantized import QuantLinear, linear_modules

    total = sum(m.weight.numel() * m.weight.element_size() for m in linear_modules(model).values())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in module.saved_tensors().values())
    return total


# ------------------------------------------------------------------ rows of the optimize report


def measure_torch_row(
    run: RunDir,
    recipe: Recipe,
    name: str,
    method: str,
    path: Path,
    model: "nn.Module | None" = None,
    details: dict[str, Any] | None = None,
    latency: bool = True,
) -> dict[str, Any]:
    """Load `path` with `load_causal_lm` (what serve does) unless a model is given, then measure it
    (latency left None when `latency` is False: the caller times several models together)."""
    from fastserve_cli.models.loader import load_causal_lm

    model = model if model is not None else load_causal_lm(path)
    perplexity = torch_perplexity(model, validation_blocks(run, recipe))
    opt = recipe.optimize
    ms = torch_decode_ms(model, *latency_workload(run, recipe), opt.latency_repeats) if latency else None
    extra = {"linear_weight_bytes": linear_weight_bytes(model), **(details or {})}
    return make_row(
        name, method, "torch", run.rel(path), parameter_count(model), weight_bytes(path), perplexity, ms, extra
    )


def measurement_key(run: RunDir, recipe: Recipe) -> dict[str, Any]:
    """What the rows were measured against; a report with a different key is stale and started afresh."""
    import torch

    train = run.stage("train") or {}
    opt = recipe.optimize
    return {
        "train_run_id": train.get("run_id"),
        "eval_blocks": opt.eval_blocks,
        "latency_prompt_tokens": opt.latency_prompt_tokens,
        "latency_new_tokens": opt.latency_new_tokens,
        "torch_threads": torch.get_num_threads(),
    }


def ensure_baseline(run: RunDir, recipe: Recipe, latency: bool = True) -> dict[str, Any]:
    """The baseline row (the trained model), measured and written unless a current report has it.

    `latency=False`: the caller times the baseline itself (optimize, interleaved with its variants) and
    writes the row; timing it here too would be thrown away.
    """
    report = current_report(run, recipe, measurement_key(run, recipe))
    row = find_row(report, BASELINE)
    if row is not None:
        return row
    if not (run.model_dir / "config.json").is_file():
        raise UserError(f"{run.model_dir}: no trained model here; run `fastserve train` first")
    row = measure_torch_row(run, recipe, BASELINE, "none", run.model_dir, latency=latency)
    if latency:
        report["rows"] = [row] + [r for r in report["rows"] if r["name"] != BASELINE]
        finish_report(run, recipe, report)
    return row


def greedy_agreement(
    reference: OnnxCausalLM, candidate: OnnxCausalLM, vocab_size: int, steps: int, seed: int = 0
) -> dict[str, float]:
    """How far a quantized graph drifts from fp32: max |Δlogits| and the share of matching greedy tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(1, 16), dtype=np.int64)
    mask = np.ones_like(ids)
    ref_tokens, ref_logits = reference.generate_greedy(ids, mask, steps)
    got_tokens, got_logits = candidate.generate_greedy(ids, mask, steps)
    diff = float(np.abs(ref_logits[0] - got_logits[0]).max())  # first step: same inputs for both
    same = ref_tokens[0] == got_tokens[0]
    first_mismatch = int(np.argmin(same)) if not same.all() else steps
    return {"first_step_max_abs_diff": diff, "matching_prefix_tokens": first_mismatch, "steps": steps}
