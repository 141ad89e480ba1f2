"""Batch padding for training (right) and generation (left)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sftflow.data.encode import IGNORE_INDEX


@dataclass
class SftCollator:
    """Pad `input_ids` with the pad id, `attention_mask` with 0 and `labels` with -100.

    Labels are built before padding, so a pad id equal to the eos id never masks the real eos.

    >>> import torch
    >>> c = SftCollator(pad_token_id=0)
    >>> c([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}])["labels"].tolist()
    [[-100, 6], [7, -100]]
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        has_labels = "labels" in features[0]
        if has_labels:
            batch["labels"] = []
        for f in features:
            ids = list(f["input_ids"])
            pad = length - len(ids)
            rows = {"input_ids": (ids, self.pad_token_id), "attention_mask": ([1] * len(ids), 0)}
            if has_labels:
                rows["labels"] = (list(f["labels"]), IGNORE_INDEX)
            for key, (values, fill) in rows.items():
                padded = values + [fill] * pad if self.padding_side == "right" else [fill] * pad + values
                batch[key].append(padded)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


@dataclass
class PackedCollator:
    """Batch packed rows (see `sftflow.data.packing`) without an attention mask.

    Shorter rows are padded with a block of pad tokens whose `position_ids` restart at 0, so the padding
    is one more "example" that attends only to itself (and is never trained: labels -100). With no
    attention_mask, transformers builds the block-diagonal causal mask from `position_ids`.

    >>> c = PackedCollator(pad_token_id=0)
    >>> b = c([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 0, 1]},
    ...        {"input_ids": [8], "labels": [-100], "position_ids": [0]}])
    >>> b["position_ids"].tolist(), b["labels"].tolist()
    ([[0, 0, 1], [0, 0, 1]], [[-100, 6, 7], [-100, -100, -100]])
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
