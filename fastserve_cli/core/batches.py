"""Training batches as a pure function of (seed, epoch, position): what makes exact resume possible.

A DataLoader with a shuffling sampler keeps its position in iterator state that cannot be saved. Here
the order of an epoch is `randperm(seed, epoch)`, a global step takes the next `world * batch` rows of
it, and rank r gets its own `batch`-sized slice, so a checkpoint only has to store (epoch, index) and
one process with batch 2B sees exactly the rows that two processes with batch B see together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastserve_cli.core.errors import UserError

IGNORE_INDEX = -100


@dataclass
class DataPosition:
    """Where the next micro-batch starts: epoch number and micro-batch index inside the epoch."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def load_splits(data_dir) -> tuple[Any, Any]:
    """The preprocessed train and validation splits (a DatasetDict saved with save_to_disk)."""
    from datasets import load_from_disk

    try:
        data = load_from_disk(str(data_dir))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{data_dir}: no preprocessed dataset here ({err}); run `fastserve preprocess` first") from None
    missing = {"train", "validation"} - set(data.keys())
    if missing:
        raise UserError(
            f"{data_dir}: dataset lacks split(s) {', '.join(sorted(missing))}; re-run `fastserve preprocess`"
        )
    for split in ("train", "validation"):
        if "input_ids" not in data[split].column_names:
            raise UserError(f"{data_dir}: split {split} has no input_ids column; re-run `fastserve preprocess`")
    return data["train"], data["validation"]


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch; depends only on (seed, epoch)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


class BatchStream:
    """Deterministic micro-batches for one rank, resumable from a `DataPosition`."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1, pad_id: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.pad_id = rank, world, pad_id
        self.rows_per_step = batch_size * world
        self.batches_per_epoch = len(dataset) // self.rows_per_step
        if self.batches_per_epoch == 0:
            raise UserError(
                f"train split has {len(dataset)} rows, fewer than one global batch of {self.rows_per_step} "
                f"(per_device_train_batch_size x processes); lower train.per_device_train_batch_size or add data"
            )
        self.position = DataPosition()
        self._order: list[int] | None = None
        self._order_epoch = -1

    def _rows_for(self, position: DataPosition) -> list[int]:
        if self._order_epoch != position.epoch:
            self._order = epoch_order(len(self.dataset), self.seed, position.epoch)
            self._order_epoch = position.epoch
        start = position.index * self.rows_per_step + self.rank * self.batch_size
        return self._order[start : start + self.batch_size]  # type: ignore[index]

    def next(self) -> dict[str, Any]:
        """The next micro-batch for this rank; advances the position (wrapping to the next epoch)."""
        rows = self._rows_for(self.position)
        self.position.index += 1
        if self.position.index >= self.batches_per_epoch:
            self.position = DataPosition(self.position.epoch + 1, 0)
        return collate(self.dataset[rows], self.pad_id)


def collate(columns: dict[str, list], pad_id: int) -> dict[str, Any]:
    """Right-pad variable-length rows (sft); packed rows are already equal length."""
    import torch

    inputs = columns["input_ids"]
    masks = columns.get("attention_mask") or [[1] * len(x) for x in inputs]
    targets = columns.get("labels") or inputs
    length = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), length), dtype=torch.long)
    labels = torch.full((len(inputs), length), IGNORE_INDEX, dtype=torch.long)
    for i, (x, m, y) in enumerate(zip(inputs, masks, targets)):
        ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(m)] = torch.as_tensor(m, dtype=torch.long)
        labels[i, : len(y)] = torch.as_tensor(y, dtype=torch.long)
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_batches(dataset, batch_size: int, pad_id: int, max_batches: int | None):
    """Validation batches in file order (every process sees them all, so all agree on the number)."""
    total = (len(dataset) + batch_size - 1) // batch_size
    if max_batches is not None:
        total = min(total, max_batches)
    for b in range(total):
        rows = range(b * batch_size, min((b + 1) * batch_size, len(dataset)))
        yield collate(dataset[list(rows)], pad_id)
