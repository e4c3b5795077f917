"""The onnxruntime backend over the export stage's graph (optimum names; CUDA EP when present, CPU otherwise)."""

from __future__ import annotations

from pathlib import Path

from fastserve_cli.serve.backend_base import Backend, read_config


class OnnxBackend(Backend):
    """onnxruntime over the export stage's graph (optimum names; CUDA EP when present, CPU otherwise)."""

    name = "onnx"

    def __init__(self, onnx_dir: Path, threads: int | None = None) -> None:
        import numpy as np

        from fastserve_cli.models.onnx import OnnxCausalLM

        super().__init__(onnx_dir, read_config(onnx_dir))
        self.session = OnnxCausalLM(onnx_dir, threads=threads, last_logits_only=True, spin=False)
        self.num_layers = self.session.num_layers
        self.num_kv_heads, self.head_dim = self.session.num_kv_heads, self.session.head_dim
        self.kv_dtype_bytes = np.dtype(self.session.kv_dtype).itemsize
        self.threads = threads
        self._scoring_session = None

    def prompt_logits(self, ids: list[int]):
        """The serving session keeps only the last position's logits (a graph cut, see OnnxCausalLM); scoring
        opens a second session on the full graph the first time a client asks for prompt logprobs."""
        import numpy as np
        import torch

        from fastserve_cli.models.onnx import OnnxCausalLM

        session = self.session
        if session.last_logits_only:
            if self._scoring_session is None:
                self._scoring_session = OnnxCausalLM(self.model_dir, threads=self.threads, spin=False)
            session = self._scoring_session
        x = np.asarray([ids], dtype=np.int64)
        logits, _ = session.step(x, np.ones_like(x), np.arange(len(ids), dtype=np.int64)[None, :])
        return torch.from_numpy(np.ascontiguousarray(logits[0], dtype=np.float32))

    def forward(self, input_ids, attention_mask, position_ids, past):
        import numpy as np
        import torch

        flat = None
        if past is not None:
            flat = [np.ascontiguousarray(t.numpy()) for kv in past for t in kv]
        logits, present = self.session.step(input_ids.numpy(), attention_mask.numpy(), position_ids.numpy(), flat)
        layers = [
            (torch.from_numpy(present[2 * i]), torch.from_numpy(present[2 * i + 1])) for i in range(self.num_layers)
        ]
        return torch.from_numpy(np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)), layers
