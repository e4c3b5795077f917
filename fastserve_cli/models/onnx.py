"""Run an exported ONNX decoder (optimum-style names, KV cache) with onnxruntime.

The graph's inputs are `input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key/.value`;
its outputs `logits`, `present.N.key/.value`; KV tensors are [batch, num_kv_heads, past_len, head_dim].
The export itself lives in `fastserve_cli.export.onnx_graph`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastserve_cli.core.errors import UserError

MODEL_FILE = "model.onnx"
# Ops that can compute the logits from the last hidden state (plain, int8 and int4 exports).
HEAD_MATMULS = ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits")
# Per-element ops a quantizer puts after the head's matmul (rescale, cast, fake-quant); row-independent.
HEAD_ELEMENTWISE = ("Cast", "Mul", "QuantizeLinear", "DequantizeLinear")
DATA_FILE = "model.onnx.data"


def logits_for_last_position(proto) -> bool:
    """Make the graph compute logits for the last position only (a server never reads the others).

    The head's matmul over every prompt position is ~30% of a GPT-2-small prefill. Its input is sliced to
    [:, -1:, :] right before the matmul, after any dynamic quantization of that input, so the last row's
    numbers are unchanged. Returns False (graph untouched) when the head is not a recognisable matmul.
    """
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type in HEAD_ELEMENTWISE:
        node = producers.get(node.input[0])  # the data path; scales and zero points are initializers
    if node is None or node.op_type not in HEAD_MATMULS:
        return False
    sliced = f"{node.input[0]}/last_position"
    constants = {"last_position_starts": [-1], "last_position_ends": [2**63 - 1], "last_position_axes": [1]}
    for name, value in constants.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    index = list(graph.node).index(node)
    graph.node.insert(
        index, onnx.helper.make_node("Slice", [node.input[0], *constants], [sliced], name="last_position_slice")
    )
    node.input[0] = sliced
    for output in graph.output:
        if output.name == "logits" and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].Clear()
            output.type.tensor_type.shape.dim[1].dim_value = 1
    return True


def providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA EP when onnxruntime has it and a GPU is visible, CPU otherwise."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if prefer_gpu and "CUDAExecutionProvider" in available and _gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


class OnnxCausalLM:
    """One onnxruntime session over an exported decoder; numpy in, numpy out.

    `step` runs one iteration (prefill with an empty past, or decode); `generate_greedy` is the
    reference decoding loop used by the parity check, the benchmark and the tests.
    """

    def __init__(
        self,
        path: str | Path,
        providers_: list[str] | None = None,
        threads: int | None = None,
        last_logits_only: bool = False,
        spin: bool = True,
    ):
        """`last_logits_only`: step() returns logits [b, 1, vocab] (see `logits_for_last_position`).
        `spin=False`: intra-op workers spin only while a run is in progress and stop the moment it returns,
        which a server wants: its engine and HTTP threads share the cores with them between runs. Spinning
        between runs cost 10% of bench_serve's throughput; not spinning at all (allow_spinning=0) cost
        batch-1 decode 8% (47.0 vs 50.8 tokens/s, same throughput)."""
        import onnxruntime as ort

        path = Path(path)
        self.path = path if path.suffix == ".onnx" else path / MODEL_FILE
        if not self.path.is_file():
            raise UserError(f"{self.path}: no ONNX model here; run `fastserve export` first")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:  # spin inside a run (fast op hand-offs), stop the moment it returns
            options.add_session_config_entry("session.force_spinning_stop", "1")
        model: str | bytes = str(self.path)
        self.last_logits_only = False
        if last_logits_only and not (self.path.parent / DATA_FILE).exists():  # bytes cannot carry external data
            import onnx

            proto = onnx.load(str(self.path))
            if logits_for_last_position(proto):
                model, self.last_logits_only = proto.SerializeToString(), True
            del proto
        self.session = ort.InferenceSession(model, options, providers=providers_ or providers())
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.num_layers = len(self.past_names) // 2
        first = inputs[self.past_names[0]]
        self.num_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = np.float16 if "float16" in first.type else np.float32

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: (logits [b, s, vocab], present KV list, 2 per layer, key then value)."""
        past = past if past is not None else self.empty_past(input_ids.shape[0])
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            **dict(zip(self.past_names, past)),
        }
        logits, *present = self.session.run(None, feed)
        return logits, present

    def generate_greedy(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy decode from left-padded prompts: (tokens [b, new_tokens], last-position logits per step)."""
        mask = attention_mask.astype(np.int64)
        positions = position_ids_from_mask(mask)
        logits, past = self.step(input_ids, mask, positions)
        tokens, step_logits = [], []
        for _ in range(new_tokens):
            last = logits[:, -1, :].astype(np.float32)
            step_logits.append(last)
            token = last.argmax(-1)
            tokens.append(token)
            next_position = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
            logits, past = self.step(token[:, None], mask, next_position, past)
            positions = next_position
        return np.stack(tokens, axis=1), step_logits


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Left padding: positions count real tokens only (pads get 0), as HF generate does."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int64)


def onnx_size_bytes(path: Path) -> int:
    """The graph plus its external data file, if any."""
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
