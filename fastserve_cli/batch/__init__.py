"""fastserve batch: OpenAI Batch API files answered by the serving engine in-process (no HTTP).

records.py holds the file formats and the resumable, append-only output; runner.py drives the engine.
The request semantics (validation, sampling, response bodies) are the server's: fastserve_cli.serve.handling.
"""

from fastserve_cli.batch.runner import BatchResult, run_batch

__all__ = ["BatchResult", "run_batch"]
