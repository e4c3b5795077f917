"""Helpers shared by the tests and the benchmark scripts, so both build and measure the same way.

- corpus: the stdlib text every test and benchmark trains and prompts on (no downloads anywhere);
- models: random-init tokenizers and models from configs (tiny GPT-2/Llama, the GPT-2-small 124M shape);
- runs: run directories whose earlier stages are done, built by hand (tiny model + real Arrow data);
- server: `fastserve serve` (or any server) as a real child process, ready-polling, /metrics parsing;
- replay: streaming HTTP completions, a seeded trace replayed open-loop at its arrival times;
- workload: the serving benchmarks' model and seeded heavy-tailed trace (scheduling and cluster benchmarks);
- load: the closed-loop load test (N streaming clients for D seconds, server RSS);
- engine: an Engine built straight from a model directory, stepped on the caller's thread.

Package code never imports this package (it is for callers of the CLI and the server, not part of them).
"""
