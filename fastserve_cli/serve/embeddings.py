"""POST /v1/embeddings: pooled last hidden states of the served model, in OpenAI's shape.

Pooling: the mean over the input's tokens of the final hidden state (after the final norm, i.e. what the LM
head reads), L2-normalized like OpenAI's embeddings. Why mean and not last-token: last-token pooling suits
decoder models *trained* as embedders (E5-Mistral, GTE-Qwen); the models this project trains are plain
language models, whose last position is specialised for predicting the next token, so its state mostly
describes the next word; the mean over all positions describes the whole text and is the robust choice.

Execution: inputs are sorted by length and run in right-padded batches of at most `MAX_BATCH_TOKENS`
tokens (right padding cannot change the real tokens of a causal model; pads are masked out of the mean).
The forward runs in a worker thread (never on the event loop), one embedding batch at a time, beside the
decode engine: the model's forward is read-only, so both threads may run it at once, and a batch is small
enough that the engine's iterations are only slowed, never stalled.
- torch backend: the model's base transformer (no LM head), `last_hidden_state`.
- onnx backend: the export has no hidden-state output, so a second onnxruntime session is built on first
  use from the same graph with the LM head's input (the final hidden state) as its only output; the
  head and KV outputs are pruned away. Graphs stored with external data (> 2 GB) cannot be rewritten in
  memory and answer a 400 naming the limitation.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fastserve_cli.serve.protocol import OpenAIError, bad_request

MAX_INPUTS = 2048
MAX_BATCH_TOKENS = 2048  # padded tokens per forward: bounds memory and how long one batch competes with decode


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # JSON types as the spec says: no "1" -> 1, no false -> 0

    model: str
    input: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1, description="Must equal the model's hidden size when given.")
    user: Optional[str] = None


def embedding_inputs(body: EmbeddingRequest, tokenizer, context: int) -> list[list[int]]:
    """The four input forms -> token-id lists, each checked (non-empty, in the vocabulary, within the context)."""
    raw = body.input
    single = isinstance(raw, str) or bool(raw) and all(isinstance(x, int) for x in raw)
    items: list = [raw] if single else list(raw)
    if not items:
        raise bad_request("'input' must not be empty", param="input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"'input' has {len(items)} items; at most {MAX_INPUTS} per request", param="input")
    vocab = len(tokenizer)
    out = []
    for i, item in enumerate(items):
        where = "input" if single else f"input[{i}]"
        ids = tokenizer.encode(item, add_special_tokens=False) if isinstance(item, str) else list(item)
        if not ids:
            raise bad_request(f"{where} is empty; every input needs at least one token", param=where)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"{where} has token ids outside the vocabulary (0..{vocab - 1})", param=where)
        if len(ids) > context:
            raise bad_request(
                f"{where} has {len(ids)} tokens but the model's context is {context}; shorten it", param=where
            )
        out.append(ids)
    return out


def batches(lengths: list[int], max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices grouped shortest-first so that (rows x longest) stays within `max_tokens` (one row at least)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over positions, then L2 normalization: [b, s, h] -> [b, h] float32."""
    weights = mask[..., None].astype(np.float32)
    mean = (hidden.astype(np.float32) * weights).sum(1) / weights.sum(1)
    norms = np.linalg.norm(mean, axis=1, keepdims=True)
    return mean / np.maximum(norms, 1e-12)


class Embedder:
    """Pooled embeddings through a backend; `hidden(ids, mask, positions)` gives the last hidden state."""

    def __init__(self, hidden: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], size: int) -> None:
        self.hidden = hidden
        self.size = size
        self.lock = threading.Lock()  # one embedding batch at a time beside the engine

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(inputs), self.size), dtype=np.float32)
        for group in batches([len(x) for x in inputs]):
            width = max(len(inputs[i]) for i in group)
            ids = np.zeros((len(group), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, i in enumerate(group):
                ids[row, : len(inputs[i])] = inputs[i]
                mask[row, : len(inputs[i])] = 1
            positions = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()
            with self.lock:
                hidden = self.hidden(ids, mask, positions)
            out[group] = pooled(hidden, mask)
        return out


def torch_hidden(backend) -> Callable:
    import torch

    model = backend.model
    base = getattr(model, "base_model", None)
    base = base if base is not None and base is not model else None

    def run(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        kwargs = {
            "input_ids": torch.from_numpy(ids).to(backend.device),
            "attention_mask": torch.from_numpy(mask).to(backend.device),
            "position_ids": torch.from_numpy(positions).to(backend.device),
            "use_cache": False,
        }
        with torch.inference_mode():
            if base is not None:
                hidden = base(**kwargs).last_hidden_state
            else:
                hidden = model(**kwargs, output_hidden_states=True).hidden_states[-1]
        return hidden.float().cpu().numpy()

    return run


def onnx_hidden(backend, threads: int | None = None) -> Callable:
    """A session over the export's graph whose only output is the LM head's input (the final hidden state)."""
    import onnx
    import onnxruntime as ort

    from fastserve_cli.models.onnx import DATA_FILE, HEAD_ELEMENTWISE, HEAD_MATMULS, providers

    session = backend.session
    if (session.path.parent / DATA_FILE).exists():
        raise unsupported(
            "this ONNX export stores its weights as external data (> 2 GB), which cannot be "
            "rewritten in memory to expose hidden states; serve the torch backend for embeddings"
        )
    proto = onnx.load(str(session.path))
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    logits = next((o for o in graph.output if o.name == "logits"), None)
    node = producers.get("logits")
    while node is not None and node.op_type in HEAD_ELEMENTWISE:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in HEAD_MATMULS or logits is None:
        raise unsupported(
            "this ONNX graph's LM head is not a recognisable matmul, so its hidden states cannot be "
            "read; serve the torch backend for embeddings"
        )
    name = node.input[0]
    while name in producers and producers[name].op_type in ("DynamicQuantizeLinear", "QuantizeLinear", "Cast"):
        name = producers[name].input[0]  # back to the float hidden state before the head's quantization
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(name, logits.type.tensor_type.elem_type, None))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    hidden_session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers())
    del proto

    def run(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feed = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            **dict(zip(session.past_names, session.empty_past(ids.shape[0]))),
        }
        return hidden_session.run([name], feed)[0]

    return run


def unsupported(message: str) -> OpenAIError:
    return OpenAIError(400, message, param="model", code="embeddings_unsupported")


def hidden_size(config: dict[str, Any]) -> int:
    return int(config.get("hidden_size") or config.get("n_embd"))


_BUILD_LOCK = threading.Lock()


def get_embedder(loaded) -> Embedder:
    """The loaded model's Embedder, built on first use (the onnx one costs a second session)."""
    with _BUILD_LOCK:
        cached = getattr(loaded, "_embedder", None)
        if isinstance(cached, OpenAIError):
            raise cached
        if cached is None:
            backend = loaded.engine.backend
            try:
                run = onnx_hidden(backend) if backend.name == "onnx" else torch_hidden(backend)
            except OpenAIError as err:
                loaded._embedder = err
                raise
            cached = loaded._embedder = Embedder(run, hidden_size(backend.config))
        return cached


async def create_embeddings(body: EmbeddingRequest, loaded, model_name: str) -> dict[str, Any]:
    extra = [k for k, v in (body.model_extra or {}).items() if v is not None]
    if extra:
        raise bad_request(f"'{extra[0]}' is not supported by this server; remove it from the request", param=extra[0])
    inputs = embedding_inputs(body, loaded.tokenizer, loaded.max_context)
    embedder = await asyncio.to_thread(get_embedder, loaded)
    if body.dimensions is not None and body.dimensions != embedder.size:
        raise bad_request(
            f"'dimensions' must be {embedder.size} (this model's hidden size) or left out; "
            f"shortened embeddings are not supported",
            param="dimensions",
        )
    vectors = await asyncio.to_thread(embedder.embed, inputs)
    data = []
    for i, vec in enumerate(vectors):
        value: Any = (
            base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
            if body.encoding_format == "base64"
            else vec.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(x) for x in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
