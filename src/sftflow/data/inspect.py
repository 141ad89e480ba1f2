"""Show tokenized data as a person checks it: decoded text with the trained spans marked, and statistics.

Pure functions over `input_ids`/`labels` rows; `sftflow preview` and `sftflow preprocess`
(`sftflow.train.preview`) print and write what they return.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import IO, Any

from sftflow.data.processor import IGNORE_INDEX

GREEN, RESET = "\x1b[32m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"


def trained_spans(input_ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Split a sequence into runs of (trained?, ids): a token is trained where its label is not -100.

    >>> trained_spans([1, 2, 3, 4], [-100, -100, 3, 4])
    [(False, [1, 2]), (True, [3, 4])]
    """
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs


def render_marked(tokenizer: Any, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded sequence with trained spans in green (color) or between `[[` and `]]` (plain text)."""
    out = []
    for trained, ids in trained_spans(input_ids, labels):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if trained:
            text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
        out.append(text)
    return "".join(out)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (q in [0, 100]).

    >>> percentile([1, 2, 3, 4], 50), percentile([1, 2, 3, 4], 100)
    (2, 4)
    """
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def length_stats(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Examples, length percentiles (p50/p90/p99/max) and the share of trained tokens.

    Rows with `input_ids`/`labels` count once; pairwise rows (`chosen_input_ids`, ...) count each side.
    """
    lengths, trained, total = [], 0, 0
    for row in rows:
        for prefix in ("", "chosen_", "rejected_"):
            ids = row.get(f"{prefix}input_ids")
            if ids is None:
                continue
            labels = row.get(f"{prefix}labels") or ids
            lengths.append(len(ids))
            total += len(ids)
            trained += sum(1 for t in labels if t != IGNORE_INDEX)
    lengths.sort()
    return {
        "sequences": len(lengths),
        "tokens": total,
        "p50": percentile(lengths, 50),
        "p90": percentile(lengths, 90),
        "p99": percentile(lengths, 99),
        "max": lengths[-1] if lengths else 0,
        "trained_share": trained / total if total else 0.0,
    }


def format_report(meta: dict[str, Any], stats: dict[str, dict[str, float]]) -> str:
    """Per-dataset row counts (read, skipped, kept) and per-split token statistics with truncated/dropped."""
    lines = ["datasets:"]
    for name, count in meta.get("datasets", {}).items():
        lines.append(
            f"  {name}: {count['read']} rows read, {count['skipped']} skipped as malformed, {count['kept']} used"
        )
    for split, numbers in stats.items():
        counts = meta.get("splits", {}).get(split, {})
        lines.append(
            f"{split}: {counts.get('examples', numbers['sequences'])} examples, "
            f"{counts.get('truncated', 0)} truncated, {counts.get('dropped', 0)} dropped (over cutoff_len); "
            f"{numbers['tokens']} tokens, length p50={numbers['p50']} p90={numbers['p90']} "
            f"p99={numbers['p99']} max={numbers['max']}; trained tokens {numbers['trained_share']:.1%}"
        )
    return "\n".join(lines)


def write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """Write each row as one JSON line (every column: input_ids, labels, chosen_*/rejected_*, ...)."""
    written = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        written += 1
    return written
