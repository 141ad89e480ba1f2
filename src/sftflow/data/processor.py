"""Tokenize conversations for sft: `input_ids` = prompt + response, `labels` = -100 except on responses.

Cutoff rule (`cutoff_len`): whole turns are kept in order while they fit; the first turn that does not
fit is cut (its response truncated from the right) only if it is the first turn, else it and later turns
are dropped. An example whose first prompt alone leaves no room for a response token is dropped, and
the drops are counted and reported, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftflow.data.template import render, split_turns

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized example, or why it was dropped."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dropped: str = ""


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Ids that end an assistant turn: the eos token(s), from the tokenizer and its generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if (
            isinstance(token_id, int)
            and token_id != tokenizer.unk_token_id
            and token in tokenizer.get_vocab()
        ):
            ids.add(token_id)
    return ids


def encode_response(ids: list[int], stop_ids: set[int], eos_id: int | None) -> tuple[list[int], list[int]]:
    """Label a response: trained up to and including its last stop token; template glue after it is masked.

    A response with no stop token gets the eos token appended (trained), so the model learns to stop.

    >>> encode_response([5, 6, 2, 9], {2}, 2)
    ([5, 6, 2, 9], [5, 6, 2, -100])
    """
    last = max((i for i, t in enumerate(ids) if t in stop_ids), default=None)
    if last is None:
        ids = [*ids, eos_id] if eos_id is not None else ids
        return ids, list(ids)
    return ids, ids[: last + 1] + [IGNORE_INDEX] * (len(ids) - last - 1)


def encode_sft(
    tokenizer: Any,
    messages: list[dict[str, str]],
    cutoff_len: int,
    train_on_prompt: bool = False,
    stop_ids: set[int] | None = None,
) -> Encoded:
    """Tokenize one conversation with its chat template and build the label mask.

    Each prompt and response piece is tokenized on its own (no special tokens added: the template
    writes them), so the prompt ids are exactly what inference tokenizes.
    """
    stop_ids = stop_token_ids(tokenizer) if stop_ids is None else stop_ids
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for turn, (prompt_text, response_text) in enumerate(split_turns(tokenizer, messages)):
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
        response, response_labels = encode_response(
            tokenizer.encode(response_text, add_special_tokens=False), stop_ids, tokenizer.eos_token_id
        )
        room = cutoff_len - len(input_ids)
        if len(prompt) + len(response) > room:
            truncated = True
            if turn > 0:
                break
            if len(prompt) >= room:
                return Encoded(
                    [], [], truncated, dropped=f"prompt has {len(prompt)} tokens >= cutoff_len {cutoff_len}"
                )
            keep = room - len(prompt)
            response, response_labels = response[:keep], response_labels[:keep]
        input_ids += prompt + response
        labels += (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response_labels
    return Encoded(input_ids, labels, truncated)


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]], cutoff_len: int) -> list[int] | None:
    """Ids of everything before the last assistant answer, with the generation prompt: what `generate`
    sees at predict time. None when longer than cutoff_len."""
    ids = tokenizer.encode(
        render(tokenizer, messages[:-1], add_generation_prompt=True), add_special_tokens=False
    )
    return ids if len(ids) <= cutoff_len else None
