"""fastserve serve: OpenAI-compatible HTTP server over a continuous-batching engine.

Layers, each testable alone: api.py (HTTP + OpenAI protocol) -> engine.py (background loop) ->
scheduler.py (which requests run each iteration) -> kv_cache.py (memory budget, host offload) ->
backends.py (torch or onnxruntime model execution). Nothing heavy is imported here.
"""
