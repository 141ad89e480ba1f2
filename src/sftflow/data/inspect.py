"""Show tokenized data as a person checks it: decoded text with the trained spans marked, and statistics.

Pure functions over `input_ids`/`labels` rows; `sftflow preview` and `sftflow preprocess`
(`sftflow.cli.preview`, `sftflow.cli.preprocess`) print and write what they return.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from sftflow.data.encode import IGNORE_INDEX, pair_labels

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sftflow.data.prepare import Prepared


logger = logging.getLogger(__name__)

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


def render_marked(
    tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int], color: bool
) -> str:
    """The decoded sequence with trained spans in green (color) or between `[[` and `]]` (plain text)."""
    out = []
    for trained, ids in trained_spans(input_ids, labels):
        text = decode_runs(tokenizer, ids)
        if trained:
            text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
        out.append(text)
    return "".join(out)


def decode_runs(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """`ids` decoded, with each run of 2+ of the same special token written `<name x N tokens>` (an image's
    tokens: `<image x 576 tokens>`, `<|vision_start|><image_pad x 64 tokens><|vision_end|>`)."""
    specials = set(tokenizer.all_special_ids)
    out: list[str] = []
    plain: list[int] = []  # decoded together, so multi-byte characters split over tokens stay whole
    start = 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and ids[i] == ids[start]:
            continue
        run = ids[start:i]
        if len(run) > 1 and run[0] in specials:
            out.append(tokenizer.decode(plain, skip_special_tokens=False))
            plain = []
            name = tokenizer.convert_ids_to_tokens(run[0]).strip("<|>")
            out.append(f"<{name} x {len(run)} tokens>")
        else:
            plain += run
        start = i
    return "".join(out) + tokenizer.decode(plain, skip_special_tokens=False)


THOUGHT = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def thought_note(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]) -> str:
    """One line on the `<think>` blocks of a sequence: how many are trained or untrained, how many are
    empty (the block of an answer without a thought), "" when there is none.

    A block counts as trained when its closing tag is.
    """
    text, trained_until = "", []  # trained_until: (end offset, trained?) per run
    for trained, ids in trained_spans(input_ids, labels):
        text += tokenizer.decode(ids, skip_special_tokens=False)
        trained_until.append((len(text), trained))
    counts: dict[str, int] = {}
    for match in THOUGHT.finditer(text):
        end = match.end() - 1
        trained = next(t for stop, t in trained_until if end < stop)
        kind = ("empty block " if not match.group(1).strip() else "thought ") + (
            "trained" if trained else "in the prompt (untrained)"
        )
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def render_example(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], index: int, color: bool) -> str:
    """One tokenized example with a header line: sft/pt rows with their trained tokens marked, pairs as
    the shared prompt with each answer marked."""
    if "chosen_ids" in row:
        cut = row["prompt_len"]
        parts = [f"--- pair {index}: prompt {cut} tokens ---", tokenizer.decode(row["chosen_ids"][:cut])]
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_ids"], pair_labels(row, side)
            trained = sum(1 for t in labels if t != IGNORE_INDEX)
            parts += [f"--- {side}: {len(ids) - cut} tokens, {trained} trained ---"]
            parts += [render_marked(tokenizer, ids[cut:], labels[cut:], color)]
        return "\n".join(parts)
    labels = row.get("labels", row["input_ids"])
    trained = sum(1 for t in labels if t != IGNORE_INDEX)
    note = thought_note(tokenizer, row["input_ids"], labels)
    note = f"; <think>: {note}" if note else ""
    header = f"--- example {index}: {len(row['input_ids'])} tokens, {trained} trained{note} ---"
    return header + "\n" + render_marked(tokenizer, row["input_ids"], labels, color)


def format_report(meta: dict[str, Any]) -> str:
    """Per-dataset row counts (read, skipped, kept) and per-split statistics (`audit.summarize`)."""
    lines = ["datasets:"]
    for name, count in meta.get("datasets", {}).items():
        lines.append(
            f"  {name}: {count['read']} rows read, {count['skipped']} skipped as malformed, {count['kept']} used"
        )
    unit = {"pt": "rows", "rm": "pairs", "dpo": "pairs"}.get(meta.get("stage", "sft"), "examples")
    for split, stats in meta.get("splits", {}).items():
        length = stats.get("length", {})
        texts = f" (from {stats['texts']} texts)" if "texts" in stats else ""
        lines.append(
            f"{split}: {stats['examples']} {unit}{texts}, {stats['truncated']} truncated, {stats['dropped']} dropped "
            f"(over cutoff_len {meta.get('cutoff_len', '?')}); {stats['tokens']} tokens, length "
            f"p50={length.get('p50', 0)} p90={length.get('p90', 0)} p99={length.get('p99', 0)} "
            f"max={length.get('max', 0)}; trained tokens {stats['trained_share']:.1%}"
        )
        if "thoughts" in stats:
            lines.append(
                f"  thoughts: {stats['thoughts']['with']} examples with one, {stats['thoughts']['without']} without"
            )
        if "duplicates" in stats:
            lines.append(
                f"  {stats['duplicates']} exact duplicates, {stats['conflicting']} prompts with differing answers, "
                f"{stats['empty_responses']} empty answers, end-of-turn untrained in {stats['eot_untrained']}"
            )
    if not meta.get("splits"):
        lines.append("(streamed: rows are read lazily and not counted)")
    return "\n".join(lines)


def write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """Write each row as one JSON line (every column: input_ids, labels, chosen_*/rejected_*, ...)."""
    written = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        written += 1
    return written


def log_examples(prepared: Prepared, tokenizer: PreTrainedTokenizerBase, rows: int) -> None:
    """Log the first examples as the model will see them, with the trained part shown separately (for
    pairs: the shared prompt, then each answer)."""
    dataset = prepared.train if prepared.train is not None else prepared.eval
    if dataset is None:
        return
    for i, example in enumerate(dataset.take(rows)):
        if "chosen_ids" in example:
            cut = example["prompt_len"]
            logger.info(
                "pair %d (prompt %d tokens)\n--- prompt ---\n%s\n--- chosen ---\n%s\n--- rejected ---\n%s",
                i,
                cut,
                tokenizer.decode(example["chosen_ids"][:cut]),
                tokenizer.decode(example["chosen_ids"][cut : example["chosen_end"]]),
                tokenizer.decode(example["rejected_ids"][cut : example["rejected_end"]]),
            )
            continue
        if "extra" in example:  # grpo: a prompt to sample from, and what the rewards get besides it
            logger.info(
                "prompt %d\n--- prompt ---\n%s\n--- to the rewards ---\n%s",
                i,
                example["prompt"],
                example["extra"],
            )
            continue
        trained = [t for t in example["labels"] if t != IGNORE_INDEX]
        logger.info(
            "example %d (%d tokens, %d trained)\n--- input ---\n%s\n--- trained on ---\n%s",
            i,
            len(example["input_ids"]),
            len(trained),
            decode_runs(tokenizer, example["input_ids"]),
            tokenizer.decode(trained),
        )
