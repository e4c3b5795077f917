"""preprocess on small real files: formats, tokenizer, packing, split, manifest, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.pipeline import execute, prepare_run_dir
from fastserve_cli.core.recipe import Recipe, resolve_paths
from fastserve_cli.core.rundir import RunDir
from fastserve_cli.testing.corpus import stdlib_texts

DOCS = stdlib_texts()


def make_recipe(tmp_path: Path, data: dict, **sections) -> Recipe:
    raw = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "data": {"block_size": 64, "validation_fraction": 0.2, **data},
        "tokenizer": {"vocab_size": 400},
        **sections,
    }
    return resolve_paths(Recipe.model_validate(raw), tmp_path)


def preprocess(recipe: Recipe):
    run = prepare_run_dir(recipe)
    return run, execute("preprocess", recipe, run)


def load_splits(run: RunDir):
    import datasets

    return datasets.load_from_disk(str(run.data_dir))


def write_text_files(folder: Path, docs=DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    return folder


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    write_text_files(tmp / "corpus")
    recipe = make_recipe(tmp, {"paths": ["corpus/*.txt"]})
    run, result = preprocess(recipe)
    return recipe, run, result


def test_text_run_writes_loadable_artifacts(text_run):
    from transformers import AutoTokenizer

    recipe, run, result = text_run
    splits = load_splits(run)
    assert set(splits) == {"train", "validation"}
    assert all(len(row) == 64 for row in splits["train"]["input_ids"])
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    assert len(tokenizer) == 400 and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert result.metrics["documents"] == len(DOCS)
    assert result.metrics["train_blocks"] == len(splits["train"]) and result.metrics["tokens_per_s"] > 0


def test_manifest_records_the_stage(text_run):
    _, run, result = text_run
    entry = run.stage("preprocess")
    assert entry["status"] == "done" and entry["fingerprint"] and entry["run_id"]
    assert entry["outputs"] == ["tokenizer", "data"]
    assert entry["metrics"] == json.loads(json.dumps(result.metrics))
    assert {"torch", "transformers", "datasets", "tokenizers"} <= set(entry["versions"])
    assert entry["started_at"] <= entry["finished_at"]
    assert (run.root / "recipe.yaml").is_file()


def test_packing_loses_and_duplicates_nothing(text_run, tmp_path):
    """The real tokens of all blocks, in order, are exactly the split's documents, each followed by EOS."""
    from transformers import AutoTokenizer

    from fastserve_cli.preprocess.stage import drop_empty, load_documents, split_documents

    recipe, run, _ = text_run
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    docs, _ = load_documents(recipe.data, str(tmp_path / "docs"))
    train_docs, val_docs = split_documents(
        drop_empty(docs, "text", False), recipe.data.validation_fraction, recipe.seed
    )
    splits = load_splits(run)
    for docs_split, blocks in ((train_docs, splits["train"]), (val_docs, splits["validation"])):
        expected = []
        for text in docs_split["text"]:
            expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        got = [
            tok for ids, mask in zip(blocks["input_ids"], blocks["attention_mask"]) for tok, m in zip(ids, mask) if m
        ]
        assert got == expected
        labels = [lab for row in blocks["labels"] for lab in row]
        assert labels.count(-100) == sum(m == 0 for row in blocks["attention_mask"] for m in row)


def test_pack_blocks_pads_only_the_tail():
    import numpy as np

    from fastserve_cli.preprocess.stage import pack_blocks

    stats = {"documents": 0, "tokens": 0}
    batches = list(pack_blocks(iter([[[1, 2, 3], [4, 5]], [[6]]]), 4, eos_id=0, pad_id=9, stats=stats))
    rows = [np.asarray(r).tolist() for b in batches for r in b.column("input_ids").to_pylist()]
    assert rows == [[1, 2, 3, 0], [4, 5, 0, 6], [0, 9, 9, 9]]
    assert batches[-1].column("labels").to_pylist() == [[0, -100, -100, -100]]
    assert stats == {"documents": 3, "tokens": 6}


def test_split_is_deterministic_by_seed(tmp_path, text_run):
    recipe, run, _ = text_run
    again = recipe.model_copy(deep=True)
    again.run_dir = str(tmp_path / "again")
    again.tokenizer.path = str(run.tokenizer_dir)
    run2, _ = preprocess(again)
    assert load_splits(run2)["validation"]["input_ids"] == load_splits(run)["validation"]["input_ids"]
    other = again.model_copy(deep=True)
    other.run_dir, other.seed = str(tmp_path / "other"), 7
    run3, _ = preprocess(other)
    assert load_splits(run3)["validation"]["input_ids"] != load_splits(run)["validation"]["input_ids"]


def test_loads_a_local_tokenizer(tmp_path, tiny_tokenizer_dir):
    write_text_files(tmp_path / "c")
    recipe = make_recipe(tmp_path, {"paths": ["c"]}, tokenizer={"path": str(tiny_tokenizer_dir)})
    run, result = preprocess(recipe)
    assert result.metrics["vocab_size"] == 512


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_structured_formats_with_text_column(tmp_path, fmt):
    import pandas as pd

    frame = pd.DataFrame({"body": DOCS, "id": range(len(DOCS))})
    path = tmp_path / f"data.{fmt}"
    {
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        "csv": lambda: frame.to_csv(path, index=False),
        "parquet": lambda: frame.to_parquet(path),
    }[fmt]()
    run, result = preprocess(make_recipe(tmp_path, {"paths": [path.name], "text_column": "body"}))
    assert result.metrics["format"] == ("json" if fmt == "jsonl" else fmt)
    assert result.metrics["documents"] == len(DOCS)


def test_chat_messages_pack_and_sft(tmp_path):
    convo = [{"role": "user", "content": "Show heapq usage"}, {"role": "assistant", "content": DOCS[5][:300]}]
    rows = [{"messages": convo}] * 8
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run, result = preprocess(make_recipe(tmp_path, {"paths": ["chat.jsonl"], "messages_column": "messages"}))
    assert result.metrics["documents"] == 8
    sft = make_recipe(
        tmp_path,
        {"paths": ["chat.jsonl"], "messages_column": "messages", "mode": "sft", "block_size": 512},
        run_dir=str(tmp_path / "sft"),
    )
    run, result = preprocess(sft)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    row = load_splits(run)["train"][0]
    trained = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
    assert trained.strip() == convo[1]["content"] + "<|im_end|>"  # the assistant turn only, not the user prompt
    assert len(row["input_ids"]) < 512  # per-example, not packed


def bad_cases(tmp_path: Path):
    write_text_files(tmp_path / "good")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe broken")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    (tmp_path / "empty" / "b.txt").write_text("")
    (tmp_path / "rows.jsonl").write_text('{"content": "x"}\n{"content": "y"}\n')
    return {
        "missing": ({"paths": ["nope.txt"]}, r"data\.paths\[0\] .*nope\.txt: no such file"),
        "glob": ({"paths": ["good/*.md"]}, r"good/\*\.md: the glob matches no files"),
        "empty": ({"paths": ["empty"]}, r"only 0 non-empty document"),
        "utf8": ({"paths": ["good", "bad.txt"]}, r"bad\.txt: not valid UTF-8 \(byte 3\)"),
        "column": ({"paths": ["rows.jsonl"]}, r"data\.text_column 'text': no such column .*columns: content"),
        "hub": (
            {"dataset": "no-such-user/no-such-dataset"},
            r"data\.dataset no-such-user/no-such-dataset: could not load it",
        ),
    }


@pytest.mark.parametrize("case", ["missing", "glob", "empty", "utf8", "column", "hub"])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, case):
    data, message = bad_cases(tmp_path)[case]
    recipe = make_recipe(tmp_path, data)
    run = prepare_run_dir(recipe)
    with pytest.raises(UserError, match=message) as err:
        execute("preprocess", recipe, run)
    assert "\n" not in str(err.value)
    assert not run.data_dir.exists() and not run.tokenizer_dir.exists()
    assert run.stage("preprocess")["status"] == "failed"
    assert sorted(p.name for p in run.root.iterdir()) == ["manifest.json", "recipe.yaml"]
    assert not [p for p in run.root.iterdir() if p.name.endswith(".tmp")]


def test_invalid_utf8_can_be_skipped(tmp_path):
    write_text_files(tmp_path / "good")
    (tmp_path / "good" / "zz.txt").write_bytes(b"\xff\xfe")
    run, result = preprocess(make_recipe(tmp_path, {"paths": ["good"], "on_decode_error": "skip"}))
    assert result.metrics["files_skipped_not_utf8"] == 1 and result.metrics["documents"] == len(DOCS)


@pytest.mark.parametrize(
    "pattern", ["**/*.py", "json/*.py", "**/json/*.py", "*/__init__.py", "email/**", "e*/[a-c]*.py"]
)
def test_glob_expansion_matches_glob_and_prunes_excluded_trees(pattern):
    import fnmatch
    import glob
    import os

    from fastserve_cli.core.sources import expand_glob
    from fastserve_cli.testing.corpus import STDLIB

    exclude = ["*/site-packages/*", "*/test/*", "*/tests/*"]
    full = f"{STDLIB}/{pattern}"
    ours = sorted({f for f in expand_glob(full, exclude) if not any(fnmatch.fnmatch(f, p) for p in exclude)})
    reference = sorted(
        f
        for f in glob.glob(full, recursive=True)
        if os.path.isfile(f) and not any(fnmatch.fnmatch(f, p) for p in exclude)
    )
    assert ours == reference and ours
