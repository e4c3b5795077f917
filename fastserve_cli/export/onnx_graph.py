"""ONNX decoder with KV cache: export from a HF model directory and check parity against PyTorch.

Why this exporter path (measured with torch 2.13 / transformers 5.24, see README "Export"):
- optimum-onnx needs transformers < 4.58, so it cannot be used here.
- `torch.onnx.export` cannot take a `DynamicCache`; `CacheWrapper` below takes plain tensors and builds
  the cache inside `forward`. The legacy (TorchScript) exporter then traces ONE graph that serves the
  empty-past first step and every later step, with eager attention (SDPA's empty-past path does not
  trace for Llama). The dynamo exporter cannot take an empty past (torch.export assumes dynamic dims
  >= 2), and transformers' own `OnnxExporter.export_for_generation` writes two graphs that each store
  the weights (1.5x the size).

The graph uses optimum's names: inputs `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.N.key/.value`; outputs `logits`, `present.N.key/.value`; KV tensors are
[batch, num_kv_heads, past_len, head_dim].
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fastserve_cli.core.errors import UserError
from fastserve_cli.models.compat import cache_kwargs, output_cache
from fastserve_cli.models.onnx import MODEL_FILE, OnnxCausalLM, position_ids_from_mask

# model_type -> family; every family here is exported by the same wrapper.
SUPPORTED_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2")

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's 2 GB limit

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """config.json, checked against what the exporter supports (before any weights are loaded)."""
    import json

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir}: no config.json; point the export at a saved HF model directory")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{model_dir}: architecture {model_type!r} is not supported by the ONNX export; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("quantization_config"):
        raise UserError(
            f"{model_dir}: a quantized PyTorch model cannot be exported (ONNX quantizes the fp32 graph "
            f"itself); set export.source to `model` or a pruning variant and use export.quantize"
        )
    return config


def load_for_export(model_dir: Path, fp16: bool = False):
    """Load with eager attention (the traceable path), in eval mode, fp16 on CUDA when asked."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = read_model_config(model_dir)
    if fp16 and not torch.cuda.is_available():
        raise UserError(
            "export.fp16: fp16 export needs a CUDA GPU and none is visible; set export.fp16=false (fp32 on CPU)"
        )
    dtype = torch.float16 if fp16 else torch.float32
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # keep stderr to the one line a failure prints
    try:
        if config.get("fastserve_attention_heads"):  # a head-pruned GPT-2 from the optimize stage
            from fastserve_cli.models.loader import load_causal_lm

            model = load_causal_lm(model_dir, dtype=dtype)
            model.set_attn_implementation("eager")
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return (model.to("cuda") if fp16 else model).eval()


def kv_shape(model) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim), read off a one-token forward so pruned models are right too."""
    import torch
    from transformers import DynamicCache

    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True, **cache_kwargs(model, DynamicCache())))
    _, kv_heads, _, head_dim = cache.layers[0].keys.shape
    return len(cache.layers), int(kv_heads), int(head_dim)


def _wrapper(model):
    """A module with plain tensor inputs/outputs that builds the DynamicCache inside forward."""
    import torch
    from transformers import DynamicCache

    class CacheWrapper(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **cache_kwargs(self.lm, cache),
            )
            present = [t for layer in output_cache(out).layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return CacheWrapper(model).eval()


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_graph(model, path: Path, opset: int = 17, external_data: bool | None = None) -> Path:
    """Trace `model` into one ONNX graph at `path` (weights in `<path>.data` when external)."""
    import torch

    layers, kv_heads, head_dim = kv_shape(model)
    inputs, outputs = io_names(layers)
    device, dtype = model.device, model.dtype
    batch, seq, past_len = 2, 3, 4  # distinct sizes so no axis is traced as a constant
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=device)
    positions = torch.arange(past_len, past_len + seq, device=device).unsqueeze(0).expand(batch, -1)
    past = [torch.zeros(batch, kv_heads, past_len, head_dim, dtype=dtype, device=device) for _ in range(2 * layers)]
    axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in inputs[3:]})
    axes.update({name: {0: "batch_size", 2: "total_sequence_length"} for name in outputs[1:]})
    wrapper = _wrapper(model)
    raw = path.parent / ".trace"
    raw.mkdir(exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            wrapper,
            (ids, mask, positions, *past),
            str(raw / MODEL_FILE),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    model.eval()  # the legacy exporter can hand the module back in training mode
    import onnx

    save_model(share_transposed_weights(onnx.load(str(raw / MODEL_FILE))), path, external_data)
    shutil.rmtree(raw, ignore_errors=True)
    return path


def save_model(src: Path | Any, dst: Path, external_data: bool | None = None) -> None:
    """Re-save an ONNX model (path or ModelProto) as one file, or with one external data file.

    external_data=None decides by size: above protobuf's 2 GB limit the weights go to `<name>.data`.
    """
    import onnx

    proto = onnx.load(str(src)) if isinstance(src, (str, Path)) else src
    if external_data is None:
        external_data = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_name = f"{dst.name}.data"
    if (dst.parent / data_name).exists():
        (dst.parent / data_name).unlink()
    onnx.save_model(
        proto,
        str(dst),
        save_as_external_data=bool(external_data),
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )


def share_transposed_weights(proto):
    """Store a tied weight once: an initializer that is exactly another one transposed (GPT-2's lm_head
    after constant folding) becomes a Transpose node of it. onnxruntime folds it back at load, so
    speed is unchanged; the file loses one vocab x hidden copy (154 MB on GPT-2-small)."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, tensor in inits.items():
        if len(tensor.dims) == 2:
            by_shape.setdefault(tuple(tensor.dims), []).append(name)
    weights = {n.input[1] for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits}
    for name in sorted(weights):
        dims = tuple(inits[name].dims)
        value = numpy_helper.to_array(inits[name])
        source = next(
            (
                c
                for c in by_shape.get(dims[::-1], [])
                if c != name and c not in weights and np.array_equal(numpy_helper.to_array(inits[c]).T, value)
            ),
            None,
        )
        if source is None:
            continue
        proto.graph.initializer.remove(inits.pop(name))
        proto.graph.node.insert(
            0, onnx.helper.make_node("Transpose", [source], [name], perm=[1, 0], name=f"shared_transpose_{name}")
        )
    return proto


def materialize_shared_weights(src: Path, dst: Path) -> Path:
    """The inverse of `share_transposed_weights` (quantizers only quantize weights stored as initializers)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    for node in [n for n in proto.graph.node if n.name.startswith("shared_transpose_")]:
        value = numpy_helper.to_array(inits[node.input[0]]).T.copy()
        proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        proto.graph.node.remove(node)
    save_model(proto, dst)
    return dst


def torch_greedy(model, input_ids, attention_mask, new_tokens: int):
    """The PyTorch reference of `OnnxCausalLM.generate_greedy`: same positions, same cache steps."""
    import torch
    from transformers import DynamicCache

    device = model.device
    mask = torch.as_tensor(attention_mask, device=device).long()
    ids = torch.as_tensor(input_ids, device=device).long()
    positions = torch.as_tensor(position_ids_from_mask(attention_mask), device=device)
    cache = DynamicCache()
    tokens, step_logits = [], []
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(model, cache)
        )
        for _ in range(new_tokens):
            last = out.logits[:, -1, :].float()
            step_logits.append(last.cpu().numpy())
            token = last.argmax(-1)
            tokens.append(token.cpu().numpy())
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **cache_kwargs(model, output_cache(out)),
            )
    return np.stack(tokens, axis=1), step_logits


def parity_prompts(vocab_size: int, batch: int, length: int, seed: int, pad_id: int = 0):
    """Random prompts, left-padded to different lengths when batch > 1 (so padding is exercised)."""
    rng = np.random.default_rng(seed + batch)
    ids = rng.integers(0, vocab_size, size=(batch, length), dtype=np.int64)
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch):
        pad = min(length - 1, row * max(1, length // (batch + 1)))
        mask[row, :pad] = 0
        ids[row, :pad] = pad_id
    return ids, mask


def check_parity(
    model,
    onnx_model: OnnxCausalLM,
    steps: int = 32,
    atol: float = 1e-3,
    batches=(1, 4),
    prompt_len: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare ONNX with PyTorch: prefill logits on real tokens, then `steps` greedy steps.

    Passing needs max |Δlogits| <= atol everywhere and identical greedy tokens for every step.
    """
    import torch

    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    results = []
    for batch in batches:
        ids, mask = parity_prompts(model.config.vocab_size, batch, prompt_len, seed, pad_id)
        with torch.no_grad():
            ref = (
                model(
                    input_ids=torch.as_tensor(ids, device=model.device),
                    attention_mask=torch.as_tensor(mask, device=model.device),
                    position_ids=torch.as_tensor(position_ids_from_mask(mask), device=model.device),
                )
                .logits.float()
                .cpu()
                .numpy()
            )
        got, _ = onnx_model.step(ids, mask, position_ids_from_mask(mask))
        real = mask.astype(bool)
        prefill_diff = float(np.abs(ref[real] - got.astype(np.float32)[real]).max())
        ref_tokens, ref_logits = torch_greedy(model, ids, mask, steps)
        ort_tokens, ort_logits = onnx_model.generate_greedy(ids, mask, steps)
        decode_diff = max(float(np.abs(a - b).max()) for a, b in zip(ref_logits, ort_logits))
        same = ref_tokens == ort_tokens
        first_mismatch = None if same.all() else int(np.argmax(~same.all(axis=0)))
        results.append(
            {
                "batch": batch,
                "prompt_len": prompt_len,
                "padded": batch > 1,
                "steps": steps,
                "prefill_max_abs_diff": prefill_diff,
                "decode_max_abs_diff": decode_diff,
                "tokens_identical": bool(same.all()),
                "first_mismatch_step": first_mismatch,
            }
        )
    max_diff = max(max(r["prefill_max_abs_diff"], r["decode_max_abs_diff"]) for r in results)
    passed = max_diff <= atol and all(r["tokens_identical"] for r in results)
    return {"passed": passed, "max_abs_diff": max_diff, "atol": atol, "steps": steps, "cases": results}


def parity_failure_message(parity: dict[str, Any], where: str) -> str:
    bad = [c for c in parity["cases"] if not c["tokens_identical"]]
    if parity["max_abs_diff"] > parity["atol"]:
        what = f"max |Δlogits| {parity['max_abs_diff']:.3g} > atol {parity['atol']:g}"
    else:
        what = f"greedy tokens differ at batch {bad[0]['batch']} step {bad[0]['first_mismatch_step']}"
    return (
        f"{where}: ONNX parity failed ({what}); the export was discarded. Check the model runs in PyTorch, "
        f"or loosen export.parity_atol if the difference is expected"
    )


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    """config, generation config and tokenizer files beside the graph: the directory is self-contained."""
    copied = []
    for name in SIDE_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
            copied.append(name)
    if not (out_dir / "generation_config.json").exists():  # older checkpoints: derive it from config.json
        from transformers import AutoConfig, GenerationConfig

        from fastserve_cli.models.eos import dir_tokenizer, generation_eos

        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
        tokenizer = dir_tokenizer(Path(model_dir))
        if tokenizer is not None and tokenizer.eos_token_id is not None:  # + the chat template's end of turn
            generation.eos_token_id = generation_eos(tokenizer, generation.eos_token_id)
        generation.save_pretrained(out_dir)
        copied.append("generation_config.json")
    return copied


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    opset: int = 17,
    fp16: bool = False,
    external_data: bool | None = None,
    parity_atol: float = 1e-3,
    parity_steps: int = 32,
    model=None,
) -> dict[str, Any]:
    """Export `model_dir` to `out_dir/model.onnx` (+ side files) and return its parity results.

    Usable without a run directory (the serve backend's tests call it). Does not raise on a parity
    failure: the caller decides (the export stage turns it into a failed stage).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else load_for_export(model_dir, fp16)
    export_graph(model, out_dir / MODEL_FILE, opset, external_data)
    copy_side_files(model_dir, out_dir)
    session = OnnxCausalLM(out_dir)
    parity = check_parity(model, session, steps=parity_steps, atol=parity_atol)
    parity.update(
        model=MODEL_FILE, opset=opset, dtype="float16" if fp16 else "float32", providers=session.session.get_providers()
    )
    return parity
