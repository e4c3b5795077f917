"""A chat fine-tune stops after its answer: the chat template's end-of-turn token ends a reply.

One real run (issue 18): a tiny pretrained GPT-2 is SFT-tuned on a few memorised questions (`messages`
JSONL, `data.mode: sft`, `model.pretrained` + `tokenizer.path`), then asked through transformers
`generate()`, the official `openai` client (chat and completions, streaming or not) against `fastserve
serve` on model/ and on the exported onnx/. Plus fast checks of how end-of-turn tokens are found.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.pipeline import execute, prepare_run_dir
from fastserve_cli.core.recipe import Recipe, resolve_paths
from fastserve_cli.models import eos
from fastserve_cli.testing.server import running_server

QA = [
    ("What is the capital of France?", "Paris."),
    ("Who wrote Hamlet?", "Shakespeare."),
    ("What is two plus two?", "Four."),
]
END = "<|im_end|>"


def chat_recipe(root: Path, base: Path | None, **sections) -> Recipe:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 8))
    raw = {
        "name": "chat",
        "run_dir": str(root / "run"),
        "data": {
            "paths": [str(root / "chat.jsonl")],
            "messages_column": "messages",
            "mode": "sft",
            "block_size": 64,
            "validation_fraction": 0.1,
        },
        "tokenizer": {"path": str(base)} if base else {"vocab_size": 300},
        "model": {"pretrained": str(base)} if base else {"architecture": "gpt2", "size": "tiny"},
        # Full fine-tune: on a random-init base LoRA needs several times the steps to memorise (the LoRA
        # merge path writes the same generation config; test_train's LoRA test checks it).
        "train": {
            "max_steps": 60,
            "learning_rate": 1e-2,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "per_device_train_batch_size": 8,
            "logging_steps": 10,
            "eval_steps": 1000,
            "save_steps": 1000,
            "sample_prompts": [chat_prompt(QA[2][0])],
            "sample_new_tokens": 24,
        },
        **sections,
    }
    return resolve_paths(Recipe.model_validate(raw), root)


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}{END}\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_gpt2_dir):
    """preprocess + train once; every test of this module reads the same run directory."""
    root = tmp_path_factory.mktemp("chat")
    optimize = {
        "variants": [
            {"name": "int8", "method": "weight_only_int8"},
            {"name": "sparse", "method": "magnitude", "sparsity": 0.2},
        ],
        "eval_blocks": 2,
        "latency_prompt_tokens": 4,
        "latency_new_tokens": 4,
        "latency_repeats": 1,
    }
    recipe = chat_recipe(root, tiny_gpt2_dir, export={"parity_steps": 8}, optimize=optimize)
    run = prepare_run_dir(recipe)
    execute("preprocess", recipe, run)
    execute("train", recipe, run)
    return recipe, run


@pytest.fixture(scope="module", params=["model", "onnx"])
def client(request, chat_run, tmp_path_factory):
    """`fastserve serve` on the run's model/ (torch) or on its exported onnx/ directory."""
    from openai import OpenAI

    recipe, run = chat_run
    target = run.model_dir
    if request.param == "onnx":
        if not (run.onnx_dir / "model.onnx").is_file():
            execute("export", recipe, run)
        target = run.onnx_dir
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(target, "--model-name", "chat", "--max-batch-size", "4", log_path=log) as (url, proc):
        yield OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    assert proc.returncode == 0, log.read_text()[-2000:]


@pytest.mark.slow
def test_generation_config_and_samples_list_end_of_turn(chat_run, tiny_gpt2_dir):
    from transformers import AutoTokenizer

    _, run = chat_run
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    expected = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)]
    generation = json.loads((run.model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == expected
    assert json.loads((tiny_gpt2_dir / "generation_config.json").read_text())["eos_token_id"] == expected[0]
    assert run.stage("preprocess")["metrics"]["reply_end_tokens"] == ["<|endoftext|>", END]
    sample = run.samples_path.read_text()
    assert sample.rstrip().endswith(f"{QA[2][1]}{END}")  # stopped at end of turn, as the server does


@pytest.mark.slow
def test_optimize_variants_and_onnx_keep_the_list(chat_run):
    recipe, run = chat_run
    execute("optimize", recipe, run)
    if not (run.onnx_dir / "model.onnx").is_file():
        execute("export", recipe, run)
    expected = json.loads((run.model_dir / "generation_config.json").read_text())["eos_token_id"]
    for directory in (run.variant_dir("int8"), run.variant_dir("sparse"), run.onnx_dir):
        assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"] == expected
        assert eos.model_dir_stop_ids(directory) == set(expected)


@pytest.mark.slow
def test_transformers_generate_stops_at_end_of_turn(chat_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run = chat_run
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    for question, answer in QA:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert tokenizer.decode(new) == answer + END  # and nothing after it


@pytest.mark.slow
def test_chat_answers_stop(client):
    for question, answer in QA:
        reply = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
        )
        choice = reply.choices[0]
        assert (choice.message.content, choice.finish_reason) == (answer, "stop")
        assert reply.usage.completion_tokens < 24


@pytest.mark.slow
def test_chat_streaming_stops(client):
    question, answer = QA[0]
    chunks = list(
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert (text, reasons) == (answer, ["stop"])


@pytest.mark.slow
def test_completions_stop_and_ignore_eos_overrides(client):
    question, answer = QA[1]
    reply = client.completions.create(model="chat", prompt=chat_prompt(question), max_tokens=24, temperature=0)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (answer, "stop")
    forced = client.completions.create(
        model="chat", prompt=chat_prompt(question), max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 12
    assert forced.choices[0].text.startswith(answer) and END not in forced.choices[0].text


# ------------------------------------------------------------------ fast: how end-of-turn tokens are found


def trained_tokenizer(specials: list[str], template: str | None):
    from conftest import stdlib_texts

    from fastserve_cli.core.tokenizer import train_bpe

    return train_bpe(stdlib_texts()[:2], 300, 2, "<|endoftext|>", "<|pad|>", specials, template)


LLAMA3 = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{% for m in messages %}{% set r = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + r + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
)
MISTRAL = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "specials, template, ends",
    [
        (["<|im_start|>", END], None, ["<|endoftext|>", END]),
        (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3, ["<|endoftext|>", "<|eot_id|>"]),
        (["<start_of_turn>", "<end_of_turn>"], GEMMA, ["<|endoftext|>", "<end_of_turn>"]),
        ([], MISTRAL, ["<|endoftext|>"]),
        ([], "{{ raise_exception('roles must alternate') }}", ["<|endoftext|>"]),
    ],
)
def test_end_of_turn_found_from_the_template(specials, template, ends):
    tokenizer = trained_tokenizer(specials, template)
    assert eos.describe(tokenizer, eos.reply_end_ids(tokenizer)) == ends
    assert eos.generation_eos(tokenizer) == (eos.reply_end_ids(tokenizer) if len(ends) > 1 else tokenizer.eos_token_id)


def test_model_dirs_from_elsewhere_stop_at_every_listed_id(tiny_gpt2_dir, tmp_path):
    end = 3  # <|im_end|> in the session tokenizer
    assert eos.model_dir_stop_ids(tiny_gpt2_dir) == {0, end}  # EOS-only generation config: the template adds it
    other = tmp_path / "other"
    shutil.copytree(tiny_gpt2_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7, 9]}))
    assert eos.model_dir_stop_ids(other) == {0, 7, 9}


def test_onnx_side_files_derive_the_list_for_old_model_dirs(tiny_gpt2_dir, tmp_path):
    from fastserve_cli.export.onnx_graph import copy_side_files

    old = tmp_path / "old"
    shutil.copytree(tiny_gpt2_dir, old)
    (old / "generation_config.json").unlink()  # a model directory saved without one
    (tmp_path / "out").mkdir()
    copy_side_files(old, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [0, 3]


def test_sft_refuses_a_terminator_that_is_not_a_special_token(tmp_path):
    recipe = chat_recipe(tmp_path, None)
    recipe.tokenizer.extra_special_tokens = ["<|im_start|>"]  # <|im_end|> would be spelt out in pieces
    with pytest.raises(UserError, match="tokenizer.extra_special_tokens"):
        execute("preprocess", recipe, prepare_run_dir(recipe))
