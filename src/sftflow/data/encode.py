"""Tokenize examples for each stage: sft conversations, pt text, rm preference pairs.

What the encoders take (the common in-memory form the loaders produce):
  - sft: `messages`, a list of `{"role": "system" | "user" | "assistant" | "tool", "content": str}` with
    at least one assistant message; `encode_sft(tokenizer, messages, cutoff_len, ...)`.
  - pt: plain strings; `encode_pretrain(tokenizer, texts, cutoff_len)` (batched).
  - rm: `prompt` messages (ending with a user/tool turn) and the `chosen` and `rejected` answers (strings
    or assistant messages); `encode_pairwise(tokenizer, prompt, chosen, rejected, cutoff_len, ...)`.

sft ids and labels. `input_ids` are the ids of the conversation exactly as the chat template renders it.
The rendered text is cut at each answer's start (where the template's generation prompt ends) and each
piece is tokenized on its own, without added special tokens (the template writes them). So the first
prompt's ids are exactly what inference tokenizes, and where a tokenizer would merge characters across a
prompt/answer boundary the prompt side wins; elsewhere the ids equal the whole rendering's ids.
`labels` are -100 on prompt tokens and train every answer up to and including its end-of-turn token
(eos, `<|im_end|>`, `<|eot_id|>`, ...: labels are built before padding, so pad == eos never masks it);
template text after the end-of-turn token is not trained. `train_on_prompt` also trains the prompts;
`mask_history` trains the last answer only.

cutoff_len policy (`cutoff_policy: truncate`, the default): an example longer than `cutoff_len` is
shortened on the prompt side first (inference sees the prompt whole, and an answer without its end is a
worse example than a question without its end) and never loses its whole answer:
  1. whole oldest turns (a user message and all that follows up to the next one) are dropped, the
     system message kept, while more than the last turn remains and the example does not fit;
  2. if the last turn alone is too long, the end of its user message is cut until the prompt fits
     beside the whole answer, but the prompt keeps at least min(its length, cutoff_len // 2) tokens
     and the user message at least its first token. The conversation is re-rendered, so the template
     head, the system message and the generation prompt stay intact;
  3. if it still does not fit, the end of the answer is cut (it then has no end-of-turn token).
An example whose prompt, so shortened, still fills cutoff_len (e.g. a system message longer than
cutoff_len) is dropped. `cutoff_policy: drop` drops every example longer than cutoff_len instead.
Truncated and dropped examples are counted and reported by the caller, never silent. After steps 1 and
2 the ids are still exactly the template's rendering of the shortened conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sftflow.data.template import render, turn_spans
from sftflow.data.thinking import Thinking, thinking_prompt, thinking_spans
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerBase


IGNORE_INDEX = -100
CutoffPolicy = Literal["truncate", "drop"]
Message = dict[str, str]
PROBE = "sftflow-probe-answer"


@dataclass
class Encoded:
    """One tokenized example, or why it was dropped (`dropped` non-empty, ids empty)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dropped: str = ""
    full_length: int = 0  # tokens before cutoff_len


@dataclass
class PairEncoded:
    """One tokenized preference pair: chosen and rejected share the same prompt ids."""

    chosen_input_ids: list[int]
    chosen_labels: list[int]
    rejected_input_ids: list[int]
    rejected_labels: list[int]
    truncated: bool = False
    dropped: str = ""
    full_length: int = 0  # tokens of the longer sequence before cutoff_len


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids that end an assistant turn: the eos token and the special token the chat template writes right
    after an answer (found by rendering a probe answer), e.g. `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}])
    except Exception:  # a template that refuses the probe: eos alone  # noqa: BLE001
        return ids
    after = text[text.rfind(PROBE) + len(PROBE) :] if PROBE in text else ""
    specials = [t for t in tokenizer.all_special_tokens if t and t in after]
    if specials:
        first = min(specials, key=lambda t: (after.index(t), -len(t)))
        if not after[: after.index(first)].strip():
            ids.add(tokenizer.convert_tokens_to_ids(first))
    return ids


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _count_stops(tokenizer: PreTrainedTokenizerBase, text: str, stop_ids: set[int]) -> int:
    """How many end-of-turn tokens `text` holds (special tokens are split out of text by their string)."""
    return sum(text.count(tokenizer.convert_ids_to_tokens(i)) for i in stop_ids)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    stop_ids: set[int],
    train_on_prompt: bool = False,
    mask_history: bool = False,
    thinking: Thinking | None = None,
) -> tuple[list[int], list[int], int]:
    """Ids and labels of a whole conversation (no cutoff), and the length of the last answer's prompt.

    The rendered text is tokenized in pieces cut where each answer starts: [start, answer 1),
    [answer 1, answer 2), ..., [last answer, end). Each piece after the first is an answer, its
    end-of-turn token, then template glue and the next prompt.

    With `thinking` (a reasoning template, see `thinking.py`) the text and its cut points come from
    `thinking_spans` in that mode instead of one rendering.

    Raises:
        SftflowError: an answer has no end-of-turn token (the model would never learn to stop), or the
            template does not render incrementally (see `turn_spans`).
    """
    if thinking is None:
        full, spans = turn_spans(tokenizer, messages)
    else:
        stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
        full, spans = thinking_spans(tokenizer, messages, thinking, stops, mask_history)
    input_ids = _ids(tokenizer, full[: spans[0][0]])
    labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(input_ids)
    last_prompt_len = len(input_ids)
    for k, (prompt_end, turn_end) in enumerate(spans):
        last = k == len(spans) - 1
        piece = _ids(tokenizer, full[prompt_end : len(full) if last else spans[k + 1][0]])
        n_stops = _count_stops(tokenizer, full[prompt_end:turn_end], stop_ids)
        stops = [i for i, t in enumerate(piece) if t in stop_ids]
        if n_stops == 0 or len(stops) < n_stops:
            raise SftflowError(
                "the chat template does not end the assistant answer with an end-of-turn token "
                f"(eos or the token after an answer; ids {sorted(stop_ids)}), so the model would never learn "
                "to stop. Use a template that writes it (e.g. {eos_token} in format_assistant)."
            )
        answer_end = stops[n_stops - 1] + 1  # the answer through its end-of-turn token
        answer = piece[:answer_end]
        rest = piece[answer_end:]  # template glue, then the next prompt
        labels += answer if last or not mask_history else [IGNORE_INDEX] * len(answer)
        labels += rest if train_on_prompt and not last else [IGNORE_INDEX] * len(rest)
        if not last:
            last_prompt_len = len(input_ids) + len(piece)
        input_ids += piece
    return input_ids, labels, last_prompt_len


def _cut_text(tokenizer: PreTrainedTokenizerBase, text: str, remove: int) -> str:
    """`text` without the characters of its last `remove` tokens (cut at a token's start offset)."""
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        keep = max(0, len(offsets) - remove)
        return text[: offsets[keep][0]] if keep < len(offsets) else text
    n = len(_ids(tokenizer, text))
    return text[: max(0, len(text) * (n - remove) // max(n, 1))]


def _turn_starts(messages: list[Message]) -> list[int]:
    """Indices of the user messages that open a turn (the cut points for dropping history)."""
    return [
        i
        for i, m in enumerate(messages)
        if m["role"] == "user" and i > 0 and messages[i - 1]["role"] != "user"
    ]


def _fit(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    cutoff_len: int,
    encode: Callable[[list[Message]], tuple[list[int], list[int], int]],
) -> tuple[list[Message], tuple[list[int], list[int], int]] | str:
    """Shorten `messages` on the prompt side to fit `cutoff_len` (steps 1 and 2 of the policy).

    `encode(messages)` returns (ids, labels, last_prompt_len). Returns the shortened messages and their
    encoding (whose answer may still need cutting, step 3), or why the example cannot fit.
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system) :]
    starts = [0, *_turn_starts(body)]
    encoded = encode(messages)
    for start in starts[1:]:  # step 1: drop the oldest whole turns
        if len(encoded[0]) <= cutoff_len:
            return messages, encoded
        candidate = system + body[start:]
        if any(m["role"] == "assistant" for m in candidate):
            messages, encoded = candidate, encode(candidate)
    ids, _, prompt_len = encoded
    target = max(min(prompt_len, cutoff_len // 2), cutoff_len - (len(ids) - prompt_len))
    users = [i for i, m in enumerate(messages[:-1]) if m["role"] == "user"]
    for attempt in range(4):  # step 2: cut the end of the last user message until the prompt fits
        if prompt_len <= target or not users:
            break
        i = users[-1]
        content = messages[i]["content"]
        cut = _cut_text(tokenizer, content, prompt_len - target + attempt * 2)
        if not cut.strip():  # an empty question is no example: keep its first token and cut the answer
            cut = _cut_text(tokenizer, content, len(_ids(tokenizer, content)) - 1)
        if cut == content:
            break
        messages = [*messages[:i], {**messages[i], "content": cut}, *messages[i + 1 :]]
        encoded = encode(messages)
        prompt_len = encoded[2]
    if prompt_len >= cutoff_len:
        return (
            f"prompt has {prompt_len} tokens even shortened, leaving no room for the answer "
            f"in cutoff_len {cutoff_len}"
        )
    return messages, encoded


def encode_sft(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    cutoff_len: int,
    train_on_prompt: bool = False,
    stop_ids: set[int] | None = None,
    *,
    mask_history: bool = False,
    cutoff_policy: CutoffPolicy = "truncate",
    thinking: Thinking | None = None,
) -> Encoded:
    """Tokenize one conversation with the tokenizer's chat template and build its label mask.

    Args:
        tokenizer: a HF tokenizer with the chat template installed (`apply_template`).
        messages: role/content dicts with at least one assistant message.
        cutoff_len: the most tokens an example may have (see the module docstring for the policy).
        train_on_prompt: also train prompt tokens.
        stop_ids: end-of-turn ids (default: `stop_token_ids(tokenizer)`; pass them to save the probe).
        mask_history: train the last answer only.
        cutoff_policy: `truncate` (shorten, prompt side first) or `drop` over-long examples.
        thinking: how thoughts are rendered and trained (`thinking.resolve_thinking`; None: no thinking).

    Returns:
        The ids and labels; `truncated` when shortened; `dropped` (a reason) with empty ids when dropped.

    Raises:
        SftflowError: the template cannot be cut into prompts and answers, or writes no end-of-turn token.
    """
    stop_ids = stop_token_ids(tokenizer) if stop_ids is None else stop_ids

    def encode(msgs: list[Message]) -> tuple[list[int], list[int], int]:
        return tokenize_conversation(tokenizer, msgs, stop_ids, train_on_prompt, mask_history, thinking)

    ids, labels, _ = encoded = encode(messages)
    full = len(ids)
    if full <= cutoff_len:
        return Encoded(ids, labels, full_length=full)
    if cutoff_policy == "drop":
        return Encoded([], [], True, dropped=f"{full} tokens > cutoff_len {cutoff_len}", full_length=full)
    fitted = _fit(tokenizer, messages, cutoff_len, lambda m: encoded if m is messages else encode(m))
    if isinstance(fitted, str):
        return Encoded([], [], True, dropped=fitted, full_length=full)
    ids, labels, _ = fitted[1]
    # step 3: cut the answer's end
    return Encoded(ids[:cutoff_len], labels[:cutoff_len], truncated=True, full_length=full)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    cutoff_len: int,
    thinking: Thinking | None = None,
) -> list[int] | None:
    """Ids of everything before the last assistant answer, with the generation prompt: what `generate`
    sees at predict time (with `thinking`, in its mode). None when longer than cutoff_len."""
    if thinking is None:
        text = render(tokenizer, messages[:-1], add_generation_prompt=True)
    else:
        text = thinking_prompt(tokenizer, messages, thinking)
    ids = _ids(tokenizer, text)
    return ids if len(ids) <= cutoff_len else None


def encode_pairwise(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[Message],
    chosen: str | Message,
    rejected: str | Message,
    cutoff_len: int,
    stop_ids: set[int] | None = None,
    cutoff_policy: CutoffPolicy = "truncate",
    thinking: Thinking | None = None,
) -> PairEncoded:
    """Tokenize a preference pair (rm stage): `prompt` + chosen answer and `prompt` + rejected answer.

    Both sequences are encoded like sft with `mask_history` (only the final answer is trained; earlier
    answers in the prompt are context) and share the same prompt ids. Over-long pairs follow the sft
    cutoff policy, with the prompt shortened once (for the longer answer) and used for both.

    Args:
        tokenizer: a HF tokenizer with the chat template installed.
        prompt: the conversation before the answers (ends with a user or tool message).
        chosen: the preferred answer (a string, or an assistant message).
        rejected: the other answer.
        cutoff_len: the most tokens per sequence.
        stop_ids: end-of-turn ids (default: `stop_token_ids(tokenizer)`).
        cutoff_policy: `truncate` or `drop`.
        thinking: how thoughts are rendered (`thinking.py`; earlier answers in the prompt lose theirs
            unless preserve_thinking). With enable_thinking null, a pair where one answer has a thought
            and the other not would not share its prompt (the empty block goes into one) and is refused.

    Raises:
        SftflowError: as `encode_sft`, or the two answers' prompts differ (see `thinking`).
    """
    stop_ids = stop_token_ids(tokenizer) if stop_ids is None else stop_ids

    def answer(value: str | Message) -> Message:
        content = value["content"] if isinstance(value, dict) else value
        return {"role": "assistant", "content": content}

    def encode(msgs: list[Message]) -> tuple[list[int], list[int], int]:
        return tokenize_conversation(tokenizer, msgs, stop_ids, mask_history=True, thinking=thinking)

    pair = [[*prompt, answer(chosen)], [*prompt, answer(rejected)]]
    encoded = [encode(m) for m in pair]
    if thinking is not None and encoded[0][0][: encoded[0][2]] != encoded[1][0][: encoded[1][2]]:
        raise SftflowError(
            "with enable_thinking: null, the chosen and rejected answers of a pair must both have a thought "
            "or both have none (the empty thought block goes into the prompt of an answer without one, so "
            "the two would not share their prompt). Give both answers thoughts, or set enable_thinking to "
            "true or false."
        )
    longest = max(len(e[0]) for e in encoded)
    if longest > cutoff_len:
        if cutoff_policy == "drop":
            reason = f"{longest} tokens > cutoff_len {cutoff_len}"
            return PairEncoded([], [], [], [], True, dropped=reason, full_length=longest)
        longer = max((0, 1), key=lambda i: len(encoded[i][0]) - encoded[i][2])
        fitted = _fit(tokenizer, pair[longer], cutoff_len, encode)
        if isinstance(fitted, str):
            return PairEncoded([], [], [], [], True, dropped=fitted, full_length=longest)
        short_prompt = fitted[0][:-1]
        encoded = [encode([*short_prompt, m[-1]]) for m in pair]
        (c_ids, c_labels, _), (r_ids, r_labels, _) = encoded
        return PairEncoded(
            c_ids[:cutoff_len],
            c_labels[:cutoff_len],
            r_ids[:cutoff_len],
            r_labels[:cutoff_len],
            True,
            full_length=longest,
        )
    (c_ids, c_labels, _), (r_ids, r_labels, _) = encoded
    return PairEncoded(c_ids, c_labels, r_ids, r_labels, full_length=longest)


def encode_pretrain(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], cutoff_len: int
) -> dict[str, list[list[int]]]:
    """pt stage: each text + eos, concatenated, cut into rows of `cutoff_len` tokens (the last row of a
    batch may be shorter). Every token is trained; rows never hold padding.

    Meant for `datasets.map(batched=True)` over a `text` column: rows do not cross map batches.
    """
    if tokenizer.eos_token_id is None:
        raise SftflowError("the pt stage appends eos to every text, but this tokenizer has no eos token.")
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    rows = [stream[i : i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    return {"input_ids": rows, "labels": [list(r) for r in rows]}


def pair_labels(row: dict[str, Any], side: str) -> list[int]:
    """The labels of one side of a tokenized pair: its answer through the end-of-turn token is trained.

    >>> pair_labels({"chosen_ids": [1, 2, 3, 4, 9], "prompt_len": 2, "chosen_end": 4}, "chosen")
    [-100, -100, 3, 4, -100]
    """
    ids, cut, end = row[f"{side}_ids"], row["prompt_len"], row[f"{side}_end"]
    return [IGNORE_INDEX] * cut + ids[cut:end] + [IGNORE_INDEX] * (len(ids) - end)
