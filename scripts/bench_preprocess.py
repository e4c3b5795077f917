#!/usr/bin/env python
"""Preprocess throughput: the whole `fastserve preprocess` stage vs bare `tokenizers` encode_batch.

Both tokenize the same texts (the stdlib .py sources of the quickstart recipe) with the same tokenizer,
in the same run; each is repeated and the best time kept. Ours is end to end: reading files through
`datasets`, the document split, tokenizing, packing, Arrow writes and save_to_disk. The baseline is
`encode_batch` over the texts already in memory plus reading the ids out (the least any consumer does),
at its faster batching (all texts in one call, or our batch size).

With --sections (default: all of them) it also measures data.clean (docs/cleaning.md):
  clean    the same stage with cleaning off and on (documents/s in, tokens/s out, what each step removed);
  neardup  near-dedup recall and precision on a corpus with planted near-duplicates (known ground truth);
  html     the HTML extractors we considered (resiliparse, trafilatura, selectolax) on generated pages:
           pages/s, article text kept, pages still carrying boilerplate (script/nav/footer text).

    flock /tmp/fastserve-bench.lock .venv/bin/python scripts/bench_preprocess.py [--repeats 3] [--sections clean,neardup]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fastserve_cli.core.pipeline import execute, prepare_run_dir
from fastserve_cli.core.recipe import Recipe, resolve_paths
from fastserve_cli.preprocess.stage import drop_empty, load_documents

ROOT = Path(__file__).resolve().parent.parent


def quickstart_data() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="tokenize,clean,neardup,html")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    from bench_clean import bench_clean, bench_html, bench_near_dedup

    if "neardup" in sections:
        print(json.dumps({"near_dedup": bench_near_dedup()}, indent=2), flush=True)
    if "html" in sections:
        print(json.dumps({"html_extractors": bench_html()}, indent=2), flush=True)
    if "clean" in sections:
        print(json.dumps({"clean": bench_clean(quickstart_data(), args.repeats)}, indent=2), flush=True)
    if "tokenize" not in sections:
        return
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = quickstart_data()
        # 1. a tokenizer, trained once, shared by both paths
        first = resolve_paths(Recipe.model_validate({**raw, "run_dir": str(tmp / "first")}), ROOT / "recipes")
        execute("preprocess", first, prepare_run_dir(first))
        tok_dir = Path(first.run_dir) / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        texts = list(drop_empty(load_documents(first.data, str(tmp / "docs"))[0], "text", False)["text"])
        backend = tokenizer.backend_tokenizer

        def baseline(batch: int) -> tuple[float, int]:
            start = time.perf_counter()
            tokens = 0
            for i in range(0, len(texts), batch):
                tokens += sum(len(e.ids) for e in backend.encode_batch(texts[i : i + batch], add_special_tokens=False))
            return time.perf_counter() - start, tokens

        def ours(k: int, num_proc: int = 1) -> tuple[float, int]:
            data = {**raw["data"], "num_proc": num_proc}
            recipe = resolve_paths(
                Recipe.model_validate(
                    {
                        **raw,
                        "data": data,
                        "run_dir": str(tmp / f"run{k}-{num_proc}"),
                        "tokenizer": {"path": str(tok_dir)},
                    }
                ),
                ROOT / "recipes",
            )
            run = prepare_run_dir(recipe)
            start = time.perf_counter()
            result = execute("preprocess", recipe, run)
            return time.perf_counter() - start, result.metrics["tokens"]

        base_times, our_times, mp_times = [], [], []
        for k in range(args.repeats):
            # the baseline gets its best batching: the whole corpus in one call, or our batch size
            base_times += [baseline(len(texts)), baseline(first.data.batch_size)]
            our_times.append(ours(k))
            mp_times.append(ours(k, num_proc=2))
        base_s, base_tokens = min(base_times)
        our_s, our_tokens = min(our_times)
        mp_s, _ = min(mp_times)
    assert base_tokens == our_tokens, (base_tokens, our_tokens)
    result = {
        "documents": len(texts),
        "tokens": our_tokens,
        "encode_batch_tokens_per_s": round(base_tokens / base_s),
        "preprocess_tokens_per_s": round(our_tokens / our_s),
        "ratio": round(base_s / our_s, 3),
        "preprocess_num_proc_2_tokens_per_s": round(our_tokens / mp_s),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
