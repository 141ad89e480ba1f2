"""Data statistics: what the tokenized data looks like at this cutoff_len, from the data step's counts.

`summarize` turns the per-example facts the tokenizers record (lengths before and after cutoff_len,
trained tokens, end-of-turn trained, content digests) into one JSON-ready dict per split. `prepare`
stores it in `meta["splits"]` (cached with the tokens), a run writes it to `data_stats.json`, and
`preview`, `plan` and `report.html` read it: nothing re-tokenizes to show it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftflow.errors import SftflowError

DATA_STATS = "data_stats.json"
HISTOGRAM_BINS = 30


def percentiles(values: Sequence[int]) -> dict[str, int]:
    """min, nearest-rank p50/p90/p95/p99 and max.

    >>> percentiles([5, 1, 3, 2, 4])
    {'min': 1, 'p50': 3, 'p90': 5, 'p95': 5, 'p99': 5, 'max': 5}
    >>> percentiles([])
    {}
    """
    ordered = sorted(values)
    if not ordered:
        return {}
    pick = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
    out = {k: ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] for k, q in pick.items()}
    return {"min": ordered[0], **out, "max": ordered[-1]}


def histogram(values: Sequence[int], bins: int = HISTOGRAM_BINS) -> dict[str, list[int]]:
    """At most `bins` bins of one integer width over [min, max]: `edges` (one more than the bins) and
    `counts`.

    >>> histogram([1, 2, 2, 4], bins=3)
    {'edges': [1, 3, 5], 'counts': [3, 1]}
    >>> histogram([1, 2, 2, 4], bins=4)
    {'edges': [1, 2, 3, 4, 5], 'counts': [1, 2, 0, 1]}
    """
    if not values:
        return {"edges": [], "counts": []}
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / bins))
    n = max(1, math.ceil((high - low + 1) / width))
    counts = [0] * n
    for v in values:
        counts[min(n - 1, (v - low) // width)] += 1
    return {"edges": [low + i * width for i in range(n + 1)], "counts": counts}


def summarize(facts: dict[str, list[Any]], truncated: int, dropped: int) -> dict[str, Any]:
    """The statistics of one split from its per-example facts.

    `facts` columns (all but `length` optional): `length` (tokens after cutoff_len, kept examples),
    `n_trained`, `eot_trained`, `empty` (kept examples), and over every example before drops:
    `full_length` (tokens before cutoff_len), `key` / `prompt_key` / `answer_key` (content digests).
    """
    lengths = facts["length"]
    trained = facts.get("n_trained", lengths)
    full = facts.get("full_length") or lengths
    stats: dict[str, Any] = {
        "examples": len(lengths),
        "truncated": truncated,
        "dropped": dropped,
        "tokens": sum(lengths),
        "trained_tokens": sum(trained),
        "trained_share": sum(trained) / max(1, sum(lengths)),
        "length": percentiles(lengths),
        "full_length": percentiles(full),
        "trained": percentiles(trained),
        "histogram": histogram(full),
    }
    if "eot_trained" in facts:
        stats["eot_untrained"] = sum(1 for ok in facts["eot_trained"] if not ok)
        stats["empty_responses"] = sum(1 for empty in facts["empty"] if empty)
    if "key" in facts:
        stats["duplicates"] = len(facts["key"]) - len(set(facts["key"]))
        answers: dict[str, set[str]] = {}
        for prompt, answer in zip(facts["prompt_key"], facts["answer_key"], strict=True):
            answers.setdefault(prompt, set()).add(answer)
        stats["conflicting"] = sum(len(a) - 1 for a in answers.values())
    return stats


def write_stats(meta: dict[str, Any], output_dir: str | Path) -> Path:
    """Write the data step's counts and statistics to `output_dir/data_stats.json`."""
    path = Path(output_dir) / DATA_STATS
    path.write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def read_stats(output_dir: str | Path) -> dict[str, Any]:
    """`data_stats.json` of a run, or {} when it wrote none."""
    path = Path(output_dir) / DATA_STATS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class DataAudit:
    """The training split as plan shows it: counts, statistics (`summarize`) and the rows training batches.

    A row is an example (sft), a cutoff_len row of concatenated texts (pt) or a pair (rm, dpo).
    """

    stage: str
    per_dataset: dict[str, int]
    examples: int  # training rows
    eval_examples: int
    cutoff_len: int
    eot_tokens: list[str]
    stats: dict[str, Any]  # the training split's statistics (`summarize`)
    lengths: list[int]  # per row, the longest sequence training runs for it (what pads its batch)
    tokens: int  # non-pad tokens training runs per epoch (pairs: both sequences)

    @classmethod
    def from_prepared(cls, prepared: Any) -> DataAudit:
        """Audit the training split of a `Prepared`. Pairs count the sequences their stage runs: rm scores
        the whole chosen and rejected conversations, dpo the prompt and each answer through its
        end-of-turn token (`chosen_end`, `rejected_end`).

        Raises:
            SftflowError: there is no training data, or it is streamed (counting reads every example).
        """
        from datasets import IterableDataset

        if prepared.train is None:
            raise SftflowError("this needs training data: set dataset and do_train: true.")
        if isinstance(prepared.train, IterableDataset):
            raise SftflowError("counting tokens reads every example; run it with streaming=false.")
        meta, train = prepared.meta, prepared.train
        if "input_ids" in train.column_names:
            pairs = [(len(ids),) for ids in train["input_ids"]]
        elif prepared.stage == "dpo":
            pairs = list(zip(train["chosen_end"], train["rejected_end"], strict=True))
        else:
            chosen, rejected = train["chosen_ids"], train["rejected_ids"]
            pairs = [(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)]
        splits = meta.get("splits", {})
        return cls(
            stage=meta.get("stage", prepared.stage),
            per_dataset={name: count["kept"] for name, count in meta.get("datasets", {}).items()},
            examples=len(pairs),
            eval_examples=splits.get("eval", {}).get("examples", 0),
            cutoff_len=meta.get("cutoff_len", 0),
            eot_tokens=meta.get("eot_tokens", []),
            stats=splits.get("train", {}),
            lengths=[max(row) for row in pairs],
            tokens=sum(sum(row) for row in pairs),
        )

    @property
    def trained_share(self) -> float:
        """Trained tokens over the tokens training runs (pairs: over both sequences)."""
        return self.stats.get("trained_tokens", 0) / max(1, self.tokens)

    def get(self, key: str, default: Any = 0) -> Any:
        """A statistic of the training split (`summarize`'s keys), `default` when the stage has none."""
        return self.stats.get(key, default)
