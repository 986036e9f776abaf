"""Training examples from `data/train.jsonl`: token ids, labels masked to the loss targets, padding.

`loss_on: assistant` keeps labels only on assistant tokens (each answer and its `<end_of_turn>`);
`loss_on: all` trains on every token but the padding.
"""

from __future__ import annotations

from typing import Any

import torch

from peftlab.data.chat import spans_to_mask

IGNORE = -100


class TokenizedRows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]], loss_on: str) -> None:
        self.examples = [self._example(row, loss_on) for row in rows]

    @staticmethod
    def _example(row: dict[str, Any], loss_on: str) -> dict[str, list[int]]:
        ids = row["input_ids"]
        if loss_on == "all":
            labels = list(ids)
        else:
            mask = spans_to_mask(len(ids), row["assistant_spans"])
            labels = [token if keep else IGNORE for token, keep in zip(ids, mask, strict=True)]
        return {"input_ids": ids, "labels": labels}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def num_tokens(self) -> int:
        return sum(len(example["input_ids"]) for example in self.examples)


class PadCollator:
    """Right-pads a batch to its longest row; padding is masked out of attention and loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            length = len(example["input_ids"])
            ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            attention[row, :length] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}
