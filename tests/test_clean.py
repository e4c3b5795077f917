"""data.clean on real files: each step on real strings, then preprocess end to end (counts, sidecar, determinism)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from conftest import stdlib_texts
from test_preprocess import load_splits, make_recipe, preprocess

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.pipeline import execute, prepare_run_dir
from fastserve_cli.preprocess import clean
from fastserve_cli.preprocess.dedup import exact_duplicates, near_duplicates

MODULES = [
    "textwrap",
    "functools",
    "itertools",
    "statistics",
    "difflib",
    "logging",
    "zipfile",
    "urllib.parse",
    "collections",
    "tarfile",
    "http.client",
    "email.message",
]


def prose_docs() -> list[str]:
    """Real English prose: each module's docstrings (classes and functions), one document per module."""
    import importlib
    import inspect

    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts = [
            inspect.getdoc(obj)
            for obj in vars(module).values()
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name
        ]
        docs.append("\n\n".join(dict.fromkeys(p for p in parts if p and len(p) > 120))[:3000])
    return docs


PROSE = prose_docs()
ARTICLE = (
    "A heap is a binary tree for which every parent node has a value less than or equal to any of its "
    "children. This implementation uses arrays for which heap[k] <= heap[2*k+1] for all k, counting elements "
    "from zero. The interesting property of a heap is that its smallest element is always the root, and "
    "pushing or popping an item costs time proportional to the logarithm of the number of items."
)
PAGE = """<!DOCTYPE html><html><head><title>T</title><style>.a{color:red}</style>
<script>var secret = "SCRIPT";</script></head><body><nav><a href="/">Home</a> <a href="/x">NAVLINK</a></nav>
<main><article><h1>Heap queues</h1><p>{body}</p></article></main><footer>FOOTER (c) 2024</footer></body></html>"""


def test_steps_on_real_strings():
    text = clean.html_to_text(PAGE.replace("{body}", "A heap is a binary tree where every parent is smaller."))
    assert "binary tree" in text and not any(t in text for t in ("SCRIPT", "color:red", "NAVLINK"))
    assert clean.fix_text("schÃ¶n und grÃ¼n") == "schön und grün"
    assert clean.normalize("ﬁne\u200b  \u00a0x \r\n\n\n\n  indented\t \n", "NFKC") == "fine   x\n\n  indented"
    assert clean.normalize("e\u0301", "NFC") == "\u00e9"
    assert (
        clean.scrub_pii("mail bob.smith@example.co.uk from 192.168.1.20 or 2001:db8::1, v1.2.3.4 ok")
        == "mail <EMAIL> from <IP> or <IP>, v1.2.3.4 ok"
    )
    assert clean.scrub_pii("version 10.1.300.2 and a::b") == "version 10.1.300.2 and a::b"
    assert clean.repetition_reason("buy now\n" * 10 + "something else") is not None
    assert all(clean.repetition_reason(doc) is None for doc in PROSE)  # real prose passes Gopher's rules
    assert clean.symbol_ratio("# # # a b") > 0.5


def test_dedup_is_exact_near_and_deterministic(tmp_path):
    docs = stdlib_texts()
    words = docs[3].split()
    near = " ".join(w if i % 60 else w.upper() + "x" for i, w in enumerate(words))  # ~1.7% of words changed
    corpus = [docs[0], docs[3], docs[1], docs[0], near, docs[2]]
    assert exact_duplicates(iter(corpus), len(corpus)).tolist() == [False, False, False, True, False, False]
    masks = [near_duplicates(iter(corpus), len(corpus), 0.8, 128, 5, 1, tmp_path).tolist() for _ in range(2)]
    assert masks[0] == masks[1] == [False, False, False, True, True, False]  # the earlier copy is the one kept


def write_corpus(folder: Path) -> dict[str, int]:
    """Real stdlib prose and code plus planted problems; returns how many of each were planted."""
    folder.mkdir(parents=True)
    docs = PROSE
    rng = random.Random(0)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    (folder / "copy.txt").write_text(docs[2])
    words = docs[5].split()
    (folder / "near.txt").write_text(" ".join(w if rng.random() > 0.01 else "CHANGED" for w in words))
    (folder / "page.html").write_text(PAGE.replace("{body}", ARTICLE))
    (folder / "short.txt").write_text("too short")
    (folder / "spam.txt").write_text("click here to win a prize today\n" * 30)
    (folder / "mojibake.txt").write_text("The cafÃ© served crÃ¨me brÃ»lÃ©e.\n" + docs[2][2000:2600])
    (folder / "pii.txt").write_text(docs[3][2000:2600] + "\nContact alice@example.org or the host at 10.0.0.7.")
    return {"exact_dedup": 1, "near_dedup": 1, "html": 1, "length": 1, "repetition": 1}


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    planted = write_corpus(tmp / "corpus")
    recipe = make_recipe(tmp, {"paths": ["corpus"], "clean": {"pii": True, "examples": 2}})
    run, result = preprocess(recipe)
    return tmp, recipe, run, result, planted


def test_clean_counts_sidecar_and_output(cleaned):
    tmp, recipe, run, result, planted = cleaned
    m = result.metrics
    n_files = len(list((tmp / "corpus").iterdir()))
    assert m["clean_documents_in"] == n_files
    for step in ("exact_dedup", "near_dedup", "length", "repetition"):
        assert m[f"clean_{step}_documents_removed"] == planted[step], step
        assert m[f"clean_{step}_characters_removed"] > 0
    assert m["clean_html_documents_removed"] == 0 and m["clean_html_characters_removed"] > 0
    assert m["clean_fix_text_characters_removed"] > 0 and m["clean_pii_characters_removed"] > 0
    assert m["clean_documents_out"] == n_files - 4 == m["documents"]
    stored = run.load_manifest()["stages"]["preprocess"]["metrics"]
    assert stored["clean_near_dedup_documents_removed"] == 1
    examples = [json.loads(line) for line in (run.data_dir / "clean_examples.jsonl").read_text().splitlines()]
    by_step = {e["step"] for e in examples}
    assert {"html", "fix_text", "pii", "length", "repetition", "exact_dedup", "near_dedup"} <= by_step
    assert all(sum(e["step"] == s for e in examples) <= 2 for s in by_step)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    splits = load_splits(run)
    text = "".join(tokenizer.decode(row["input_ids"]) for split in splits.values() for row in split)
    assert "<EMAIL>" in text and "alice@example.org" not in text and "crème brûlée" in text
    assert "NAVLINK" not in text and "SCRIPT" not in text and "click here to win" not in text


def test_same_corpus_and_recipe_same_output(cleaned, tmp_path):
    tmp, recipe, run, result, _ = cleaned
    again = recipe.model_copy(update={"run_dir": str(tmp_path / "again")})
    run2, result2 = preprocess(again)

    def digest(r):
        splits = load_splits(r)
        return hashlib.sha256(
            json.dumps({k: [list(x) for x in v["input_ids"]] for k, v in splits.items()}).encode()
        ).hexdigest()

    assert digest(run) == digest(run2)
    assert (run.data_dir / "clean_examples.jsonl").read_text() == (run2.data_dir / "clean_examples.jsonl").read_text()


def test_language_filter_and_unreadable_html(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        (folder / f"en{i}.txt").write_text(PROSE[i])
    (folder / "fr.txt").write_text(
        "Le chat est assis sur le tapis et regarde la pluie tomber doucement. Demain, "
        "nous irons au marché acheter des pommes, du pain frais et un peu de fromage. "
        "La bibliothèque municipale ouvre ses portes à neuf heures chaque matin."
    )
    recipe = make_recipe(
        tmp_path, {"paths": ["mixed"], "clean": {"languages": ["en"], "min_language_score": 0.5, "near_dedup": None}}
    )
    run, result = preprocess(recipe)
    assert result.metrics["clean_language_documents_removed"] == 1
    (folder / "broken.html").write_bytes(b"<html><body>\xff\xfe caf\xe9</body></html>")
    bad = make_recipe(tmp_path, {"paths": ["mixed"], "clean": {}}, run_dir=str(tmp_path / "bad"))
    run = prepare_run_dir(bad)
    with pytest.raises(UserError, match=r"broken\.html: not valid UTF-8") as err:
        execute("preprocess", bad, run)
    assert "\n" not in str(err.value) and not run.data_dir.exists()
