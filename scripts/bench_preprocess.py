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
import html as htmllib
import json
import random
import re
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


# ---------------------------------------------------------------- data.clean sections


# Code corpora: Gopher's prose heuristics would drop real code ('#' comments count as symbols), so the
# code recipe turns them off; everything else runs.
CODE_CLEAN = {"repetition": False, "max_symbol_ratio": None}


def bench_clean(raw: dict, repeats: int) -> dict:
    """The quickstart corpus through the whole preprocess stage, cleaning off vs on, interleaved."""
    results: dict[str, list] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeats):
            for mode in ("off", "on"):
                data = {**raw["data"], **({"clean": CODE_CLEAN} if mode == "on" else {})}
                recipe = resolve_paths(
                    Recipe.model_validate({**raw, "data": data, "run_dir": f"{tmp}/{mode}{k}"}), ROOT / "recipes"
                )
                start = time.perf_counter()
                metrics = execute("preprocess", recipe, prepare_run_dir(recipe)).metrics
                results[mode].append((time.perf_counter() - start, metrics))
    out = {}
    for mode, runs in results.items():
        best, metrics = min(runs, key=lambda r: r[0])
        docs_in = metrics.get("clean_documents_in", metrics["documents"])
        out[mode] = {
            "seconds_best": round(best, 2),
            "seconds_all": [round(r[0], 2) for r in runs],
            "documents_in": docs_in,
            "documents_out": metrics["documents"],
            "tokens": metrics["tokens"],
            "documents_per_s": round(docs_in / best, 1),
            "tokens_per_s": round(metrics["tokens"] / best),
        }
        if mode == "on":
            out[mode]["removed"] = {
                k[len("clean_") :]: v
                for k, v in metrics.items()
                if k.startswith("clean_") and k.endswith("_removed") and v
            }
            out[mode]["clean_s"] = metrics["clean_s"]
    out["slowdown"] = round(out["on"]["seconds_best"] / out["off"]["seconds_best"], 2)
    return out


def _vocabulary() -> list[str]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    words = re.findall(
        r"[a-z]{3,12}", "\n".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:80])
    )
    return sorted(set(words))


def planted_corpus(n_docs: int, n_near: int, seed: int) -> tuple[list[str], set[tuple[int, int]]]:
    """Zipfian random-word documents (200-400 words) plus near-copies of some of them: 0.5-2% of words
    substituted, a word or two inserted or deleted, a different header line. Returns the shuffled corpus and the
    (earlier, later) index pairs that are planted near-duplicates."""
    rng = random.Random(seed)
    vocab = _vocabulary()
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    base = [rng.choices(vocab, weights, k=rng.randint(200, 400)) for _ in range(n_docs)]
    docs = [("Posted by staff\n", words) for words in base]
    origin = list(range(n_docs))
    for i in rng.sample(range(n_docs), n_near):
        words = list(base[i])
        rate = rng.uniform(0.005, 0.02)
        words = [rng.choice(vocab) if rng.random() < rate else w for w in words]
        for _ in range(rng.randint(0, 2)):
            words.insert(rng.randrange(len(words)), rng.choice(vocab))
        if rng.random() < 0.5:
            del words[rng.randrange(len(words))]
        docs.append((f"Updated {rng.randint(1, 28)} March, share this page\n", words))
        origin.append(i)
    for i in rng.sample(range(n_docs), n_near // 2):  # hard negatives: same opening, different rest (not duplicates)
        keep = int(len(base[i]) * rng.uniform(0.4, 0.6))
        docs.append(("Posted by staff\n", base[i][:keep] + rng.choices(vocab, weights, k=len(base[i]) - keep)))
        origin.append(None)
    order = list(range(len(docs)))
    rng.shuffle(order)
    texts = [docs[j][0] + " ".join(docs[j][1]) for j in order]
    position = {j: k for k, j in enumerate(order)}
    pairs = set()
    for j in range(n_docs, len(docs)):
        if origin[j] is None:
            continue
        a, b = position[origin[j]], position[j]
        pairs.add((min(a, b), max(a, b)))
    return texts, pairs


def bench_near_dedup(
    n_docs: int = 2000, n_near: int = 400, threshold: float = 0.7, ngram: int = 3, seed: int = 0
) -> dict:
    import numpy as np

    from fastserve_cli.preprocess.dedup import near_duplicates, shingles

    texts, pairs = planted_corpus(n_docs, n_near, seed)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dup = near_duplicates(iter(texts), len(texts), threshold, 128, ngram, 1, Path(tmp))
        seconds = time.perf_counter() - start
    removed = set(np.flatnonzero(dup).tolist())
    later = {b for _, b in pairs}
    found = sum(1 for a, b in pairs if b in removed)
    true_positive = len(removed & later)

    def jaccard(a: int, b: int) -> float:
        x, y = set(shingles(texts[a], ngram)), set(shingles(texts[b], ngram))
        return len(x & y) / len(x | y)

    sims = sorted(jaccard(a, b) for a, b in pairs)
    return {
        "documents": len(texts),
        "planted_pairs": len(pairs),
        "hard_negatives": n_near // 2,
        "threshold": threshold,
        "ngram": ngram,
        "true_jaccard_of_pairs": {
            "min": round(sims[0], 3),
            "median": round(sims[len(sims) // 2], 3),
            "max": round(sims[-1], 3),
        },
        "removed": len(removed),
        "recall": round(found / len(pairs), 4),
        "precision": round(true_positive / max(1, len(removed)), 4),
        "documents_per_s": round(len(texts) / seconds, 1),
    }


def _pages(n: int, seed: int) -> list[tuple[list[str], str]]:
    import importlib
    import inspect

    paragraphs = []
    for name in (
        "textwrap",
        "heapq",
        "json",
        "argparse",
        "collections",
        "functools",
        "itertools",
        "pathlib",
        "random",
        "statistics",
        "difflib",
        "logging",
        "zipfile",
        "tarfile",
    ):
        module = importlib.import_module(name)
        paragraphs += [
            re.sub(r"\s+", " ", inspect.getdoc(o))
            for o in vars(module).values()
            if (inspect.isfunction(o) or inspect.isclass(o)) and inspect.getdoc(o) and len(inspect.getdoc(o)) > 200
        ]
    rng = random.Random(seed)
    nav = "".join(f'<li><a href="/{w}">{w}</a></li>' for w in "Home About Products Blog Contact Login".split())
    pages = []
    for i in range(n):
        body = rng.sample(paragraphs, 4)
        article = "".join(f"<p>{htmllib.escape(t)}</p>\n" for t in body)
        pages.append(
            (
                body,
                f"""<!DOCTYPE html><html><head><title>Page {i}</title><style>body{{color:red}}</style>
<script>var tracking = "SCRIPTTOKEN";</script></head><body><header><nav><ul>{nav}</ul></nav></header>
<div class="sidebar"><h3>Related posts</h3><ul><li><a href="/a">Ten tips for NAVTOKEN</a></li></ul></div>
<main><article><h1>Article {i}</h1>{article}</article></main>
<footer><p>Copyright 2024 FOOTERTOKEN Inc. All rights reserved.</p></footer></body></html>""",
            )
        )
    return pages


def bench_html(n: int = 300, seed: int = 0) -> dict:
    def resiliparse(page: str) -> str:
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(page, main_content=True)

    def trafilatura(page: str) -> str:
        import trafilatura as t

        return t.extract(page, include_comments=False, deduplicate=False) or ""

    def selectolax(page: str) -> str:
        from selectolax.lexbor import LexborHTMLParser

        tree = LexborHTMLParser(page)
        for node in tree.css("script,style,nav,header,footer,aside,noscript"):
            node.decompose()
        return tree.body.text(separator="\n") if tree.body else ""

    pages = _pages(n, seed)
    out = {}
    for name, fn in (
        ("resiliparse (main_content)", resiliparse),
        ("trafilatura", trafilatura),
        ("selectolax (tags stripped)", selectolax),
    ):
        try:
            fn(pages[0][1])
        except ImportError:
            out[name] = "not installed"
            continue
        start = time.perf_counter()
        texts = [fn(page) for _, page in pages]
        seconds = time.perf_counter() - start
        ws = lambda s: re.sub(r"\s+", " ", s)  # noqa: E731
        kept = sum(ws(p)[:60] in ws(t) for (body, _), t in zip(pages, texts) for p in body) / (4 * n)
        boiler = sum(any(tok in t for tok in ("SCRIPTTOKEN", "NAVTOKEN", "FOOTERTOKEN")) for t in texts) / n
        out[name] = {
            "pages_per_s": round(n / seconds),
            "article_paragraphs_kept": round(kept, 3),
            "pages_with_boilerplate": round(boiler, 3),
        }
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="tokenize,clean,neardup,html")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
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
