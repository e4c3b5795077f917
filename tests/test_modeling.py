"""Model table, config overrides, deterministic batches, checkpoint verification: no training here."""

from __future__ import annotations

import pytest

from fastserve_cli.core.batches import BatchStream, DataPosition, collate
from fastserve_cli.core.errors import UserError
from fastserve_cli.models.modeling import SIZES, apply_overrides, architecture_config, memory_error
from fastserve_cli.train import checkpoint as ckpt


def meta_parameters(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_base_size_is_gpt2_124m_shape():
    config = architecture_config("gpt2", "base", 50257, 1024, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1})
    assert meta_parameters(config) == 124_439_808  # GPT-2 small, as published


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_sizes_grow_and_follow_the_table(architecture):
    counts = []
    for size, (layers, width, heads) in SIZES.items():
        config = architecture_config(architecture, size, 8192, 256, {"eos_token_id": 0})
        assert (
            config.num_hidden_layers == layers and config.hidden_size == width and config.num_attention_heads == heads
        )
        counts.append(meta_parameters(config))
    assert counts == sorted(counts)


def test_config_override_typo_is_a_user_error():
    config = architecture_config("gpt2", "tiny", 512, 64, {})
    apply_overrides(config, {"n_layer": 3})
    assert config.n_layer == 3
    with pytest.raises(UserError, match=r"model.config.n_layers: .* did you mean n_layer\?"):
        apply_overrides(config, {"n_layers": 3})


def test_allocation_failure_names_the_knobs():
    import torch

    try:
        torch.empty(2**50, dtype=torch.float32)  # a real failed allocation (4 PiB)
    except RuntimeError as err:
        converted = memory_error(err, "training step 1")
    assert isinstance(converted, UserError)
    assert "per_device_train_batch_size" in str(converted) and "gradient_accumulation_steps" in str(converted)
    other = ValueError("shape mismatch")
    assert memory_error(other, "x") is other


def rows(n: int, length: int = 4) -> list[dict]:
    return [{"input_ids": [i] * length, "attention_mask": [1] * length, "labels": [i] * length} for i in range(n)]


class ListData:
    """The two things BatchStream needs from a datasets.Dataset: len() and column access by row list."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        picked = [self.items[i] for i in index]
        return {key: [r[key] for r in picked] for key in picked[0]}


def first_tokens(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_two_ranks_see_exactly_the_one_process_batch():
    data = ListData(rows(40))
    one = BatchStream(data, batch_size=4, seed=7)
    ranks = [BatchStream(data, batch_size=2, seed=7, rank=r, world=2) for r in range(2)]
    for _ in range(25):  # crosses epoch boundaries (10 global batches per epoch)
        assert first_tokens(one.next()) == first_tokens(ranks[0].next()) + first_tokens(ranks[1].next())


def test_order_is_a_function_of_seed_epoch_and_position():
    data = ListData(rows(30))
    stream = BatchStream(data, batch_size=3, seed=1)
    seen = [first_tokens(stream.next()) for _ in range(14)]
    assert sorted(sum(seen[:10], [])) == list(range(30))  # one epoch covers every row once
    assert seen[10:] != seen[:4]  # the next epoch is shuffled differently
    resumed = BatchStream(data, batch_size=3, seed=1)
    resumed.position = DataPosition(epoch=1, index=0)
    assert [first_tokens(resumed.next()) for _ in range(4)] == seen[10:]
    assert [first_tokens(BatchStream(data, 3, seed=2).next()) for _ in range(1)] != seen[:1]


def test_collate_right_pads_sft_rows():
    batch = collate(
        {"input_ids": [[5, 6, 7], [8]], "attention_mask": [[1, 1, 1], [1]], "labels": [[-100, 6, 7], [8]]}, pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_too_little_data_for_one_batch_is_a_user_error():
    with pytest.raises(UserError, match="per_device_train_batch_size"):
        BatchStream(ListData(rows(3)), batch_size=4, seed=0)


def test_checkpoint_checksums_and_pruning(tmp_path):
    for step in (2, 4, 6):
        directory = ckpt.step_dir(tmp_path, step)
        directory.mkdir()
        (directory / "optimizer.pt").write_bytes(bytes([step]) * 64)
        ckpt.seal(directory, {"step": step})
    assert ckpt.verify(ckpt.step_dir(tmp_path, 6))["step"] == 6
    (ckpt.step_dir(tmp_path, 6) / "optimizer.pt").write_bytes(b"\0" * 64)
    warnings: list[str] = []
    path, state = ckpt.newest_valid(tmp_path, warnings.append)
    assert state["step"] == 4 and path.name == "step-4"
    assert "step-6" in warnings[0] and "checksum" in warnings[0]
    removed = ckpt.prune(tmp_path, keep=1)
    assert [p.name for p in removed] == ["step-2", "step-4"]
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step-6"]
