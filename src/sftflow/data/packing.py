"""Packing (`packing: true`): several tokenized examples share one row of at most `cutoff_len` tokens.

Each packed row carries `position_ids` that restart at 0 for every example and no `attention_mask`.
That is transformers' padding-free format: flash-attention reads the sequence boundaries from the
position ids, and sdpa/eager build a block-diagonal causal mask from them (`masking_utils.
find_packed_sequence_indices`, used when attention_mask is None and there is no KV cache: the workflow
sets `use_cache = False`). So no token attends to another example, each example sees the positions it
would see alone, and its loss is the same as unpacked. The first label of every example is -100, so no
token is trained to predict the start of the next example.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

from sftflow.data.encode import IGNORE_INDEX

if TYPE_CHECKING:
    from datasets import Dataset


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity (best-fit decreasing).

    Deterministic: ties keep the original order. Every length must be <= capacity.

    >>> pack_lengths([5, 3, 4, 2], 8)
    [[0, 1], [2, 3]]
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example is longer than the packing capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))  # the tightest bin that still fits
        if at == len(free):
            bins.append([i])
            space, b = capacity - lengths[i], len(bins) - 1
        else:
            space, b = free.pop(at)
            bins[b].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, b))
    return [sorted(b) for b in bins]


def packed_row_lengths(lengths: list[int], capacity: int) -> list[int]:
    """The lengths of the rows `pack_dataset` builds from examples of these lengths (what plan batches).

    >>> packed_row_lengths([3, 4, 5, 2], 8)
    [8, 6]
    """
    return [sum(lengths[i] for i in group) for group in pack_lengths(lengths, capacity)]


def pack_rows(examples: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Concatenate examples into one packed row with restarting `position_ids`.

    >>> pack_rows([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8, 9], "labels": [-100, 8, 9]}])
    {'input_ids': [5, 6, 7, 8, 9], 'labels': [-100, 6, -100, 8, 9], 'position_ids': [0, 1, 0, 1, 2]}
    """
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        ids = list(example["input_ids"])
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX, *list(example["labels"])[1:]]
        row["position_ids"] += list(range(len(ids)))
    return row


def pack_dataset(dataset: Dataset, cutoff_len: int) -> Any:
    """Pack a tokenized `datasets.Dataset` (input_ids, labels) into rows of at most `cutoff_len` tokens.

    Returns:
        A `datasets.Dataset` with input_ids, labels and position_ids; fewer, fuller rows.
    """
    from datasets import Dataset

    lengths = [len(ids) for ids in dataset["input_ids"]]
    all_ids, all_labels = dataset["input_ids"], dataset["labels"]
    rows = [
        pack_rows([{"input_ids": all_ids[i], "labels": all_labels[i]} for i in group])
        for group in pack_lengths(lengths, cutoff_len)
    ]
    return Dataset.from_dict(
        {key: [row[key] for row in rows] for key in ("input_ids", "labels", "position_ids")}
    )
