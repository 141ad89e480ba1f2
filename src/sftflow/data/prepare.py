"""The data step of every stage: load the registered datasets, hold out eval data, tokenize, count, cache.

`prepare(stage, data_args, tokenizer, seed, do_train)` is the one entry point; `sftflow train`,
`preview`, `preprocess`, `plan` and `report` (through the `data_stats.json` a run writes) all see its
result, so what they show is what training gets. The stage picks the data form:

  - pt: plain texts, each + eos, concatenated and cut into cutoff_len rows (`encode_pretrain`);
  - sft: conversations -> input_ids/labels (`encode_sft`, the cutoff policy of `encode.py`);
  - rm, dpo: preference pairs -> chosen_ids/rejected_ids on one shared prompt (`encode_pairwise`);
  - kto: tagged conversations (kto_tag) -> the sft encoding with only the last answer trained, + `label`;
  - grpo: prompts -> the rendered generation prompt (`prompt`) and the rewards' extra columns (`tokenize_grpo`);
  - predict prompts: `tokenize_prompts` (generation inputs from held-out conversations).

Rows stay in dataset order; a run shuffles its training split after the step (`shuffled`). The tokenized
splits, the held-out rows as loaded and the counts (`meta`) are cached under one key for every stage
(see `cache.py`). Streamed data is tokenized lazily and neither cached nor counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sftflow.data.audit import summarize
from sftflow.data.cache import TokenizedCache, cache_key
from sftflow.data.encode import (
    IGNORE_INDEX,
    encode_pairwise,
    encode_pretrain,
    encode_prompt,
    encode_sft,
    stop_token_ids,
)
from sftflow.data.images import ImageError
from sftflow.data.loader import LoadReport, load_conversations, split_train_eval
from sftflow.data.template import render
from sftflow.data.thinking import Thinking, has_thought, resolve_thinking, split_thought, thinking_prompt
from sftflow.data.vision import FAMILIES, Vision, image_digests, mask_images
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedTokenizerBase

    from sftflow.config.args import DataArguments

logger = logging.getLogger(__name__)

# stage -> the data form its datasets are read and tokenized in (rm and dpo share pairs)
FORMS = {"pt": "pt", "sft": "sft", "rm": "rm", "dpo": "rm", "kto": "kto", "grpo": "grpo"}


@dataclass
class Prepared:
    """The data step's output.

    `train` / `eval`: the tokenized splits (None when absent); `held_out`: the held-out rows as loaded
    (conversations or pairs: predict answers them, rm scores them); `meta`: `stage`, per-dataset row
    counts (`datasets`: read / skipped / kept) and per-split statistics (`splits`, see `audit.summarize`),
    what a run writes to `data_stats.json`.
    """

    stage: str
    train: Any = None
    eval: Any = None
    held_out: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def prepare(
    stage: str,
    data: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    do_train: bool = True,
    use_cache: bool = True,
    vision: Vision | None = None,
) -> Prepared:
    """Load, split and tokenize the data of `stage` (pt, sft, rm or dpo), or reuse the tokenized cache when
    the data files, tokenizer, template and every preprocessing flag are unchanged (and, with images, the
    image processor settings and every image file's content: see `vision.py`).

    Args:
        stage: the stage whose data form to build.
        data: the run's data arguments.
        tokenizer: the tokenizer with its chat template installed.
        seed: seeds sampling, interleaving and the val_size split.
        do_train: build the training split (without it only held-out data is built).
        use_cache: read and write the tokenized cache (never for streams).
        vision: the model's image handling (`vision.load_vision`); None for a text-only model, whose data
            must hold no images.

    Raises:
        SftflowError: a dataset is missing or malformed, or no example fits cutoff_len.
    """

    form = FORMS[stage]
    cache = None
    if use_cache and not data.streaming:
        splits = ["train", "eval"] if do_train else ["eval"]
        extra = vision.fingerprint() if vision is not None else None
        key = cache_key(data, form, seed, splits, tokenizer, extra)
        cache = TokenizedCache.for_key(key, data.tokenized_cache_dir)
        hit = None if data.overwrite_cache else cache.load()
        if hit is not None and not _images_unchanged(hit[1]):
            hit = None
        if hit is not None:
            parts, meta = hit
            return Prepared(stage, parts.get("train"), parts.get("eval"), parts.get("held_out"), meta)
    report = LoadReport()
    train_rows, held_out = load_datasets(data, seed, form, do_train, report)
    stop_ids = stop_token_ids(tokenizer)
    stats: dict[str, dict[str, Any]] = {}
    tokenized = {}
    for split, rows in (("train", train_rows), ("eval", held_out)):
        if rows is None:
            tokenized[split] = None
        elif form == "pt":
            tokenized[split] = tokenize_texts(rows, tokenizer, data, split, stats.setdefault(split, {}))
        elif form == "grpo":
            tokenized[split] = tokenize_grpo(rows, tokenizer, data, split, stats.setdefault(split, {}))
        elif form in ("sft", "kto"):  # kto: the completion is the last answer, so only it is trained
            form_data = dataclasses.replace(data, mask_history=True) if form == "kto" else data
            tokenized[split] = tokenize_sft(
                rows, tokenizer, form_data, stop_ids, split, stats.setdefault(split, {}), vision
            )
        else:
            tokenized[split] = tokenize_pairs(
                rows, tokenizer, data, stop_ids, split, stats.setdefault(split, {})
            )
    meta = {
        "stage": stage,
        "cutoff_len": data.cutoff_len,
        "eot_tokens": sorted(tokenizer.convert_ids_to_tokens(sorted(stop_ids))),
        "datasets": {name: dataclasses.asdict(count) for name, count in report.datasets.items()},
        "splits": {split: numbers for split, numbers in stats.items() if numbers},  # streams: uncounted
    }
    if vision is not None and cache is not None:
        refs = [
            ref
            for part in (train_rows, held_out)
            if part is not None
            for refs in part["images"]
            for ref in refs
        ]
        meta["image_digests"] = image_digests(refs)
    if cache is not None and cache_key(data, form, seed, splits, tokenizer, extra) != key:
        logger.warning(
            "a data file changed while the data step ran; its tokenized data is not cached (the next run "
            "reads the files again)."
        )
    elif cache is not None:
        cache.save({"train": tokenized["train"], "eval": tokenized["eval"], "held_out": held_out}, meta)
    return Prepared(stage, tokenized["train"], tokenized["eval"], held_out, meta)


def _images_unchanged(meta: dict[str, Any]) -> bool:
    """Whether every image file a cache entry counted still has the content it had then."""
    saved = meta.get("image_digests") or {}
    if not saved:
        return True
    if image_digests(list(saved)) == saved:
        return True
    logger.info("an image file changed since the tokenized cache was built; rebuilding it.")
    return False


def load_datasets(
    data: DataArguments, seed: int, form: str, do_train: bool = True, report: LoadReport | None = None
) -> tuple[Any, Any]:
    """The training rows (None without do_train) and the held-out rows (eval_dataset, or a val_size
    split), in the common form `form` (pt, sft or rm), in dataset order.

    `report` collects per-dataset row counts. A streamed held-out set is small (val_size is a count) and is
    read into memory, so eval and predict can index it.
    """
    from datasets import Dataset, IterableDataset

    train = load_conversations(data.dataset, data, seed, form, report) if data.dataset else None
    held_out = None
    if data.eval_dataset:
        held_out = load_conversations(data.eval_dataset, data, seed, form, report)
    elif data.val_size and train is not None:
        train, held_out = split_train_eval(train, data.val_size, seed)
    if isinstance(held_out, IterableDataset):
        held_out = Dataset.from_list(list(held_out), features=held_out.features)
    return (train if do_train else None), held_out


def shuffled(dataset: Dataset | IterableDataset | None, seed: int, buffer_size: int) -> Any:
    """The training split in a seeded random order (a stream through a shuffle buffer)."""
    from datasets import IterableDataset

    if dataset is None:
        return None
    if isinstance(dataset, IterableDataset):
        return dataset.shuffle(seed=seed, buffer_size=buffer_size)
    return dataset.shuffle(seed=seed)


def _num_proc(data: DataArguments, rows: Any) -> int | None:
    workers = data.preprocessing_num_workers
    return min(workers, len(rows)) if workers and workers > 1 else None


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _trained_facts(labels: list[int], stop_ids: set[int]) -> dict[str, Any]:
    """Per-sequence counts the statistics need: trained tokens, whether the last trained token ends a
    turn, and whether nothing but end-of-turn tokens is trained."""
    trained = [t for t in labels if t != IGNORE_INDEX]
    return {
        "n_trained": len(trained),
        "eot_trained": bool(trained) and trained[-1] in stop_ids,
        "empty": not [t for t in trained if t not in stop_ids],
    }


FACT_COLUMNS = [
    "length",
    "full_length",
    "n_trained",
    "eot_trained",
    "empty",
    "key",
    "prompt_key",
    "answer_key",
]
BEFORE_DROPS = ["full_length", "key", "prompt_key", "answer_key"]


def _drop_and_count(encoded: Dataset, split: str, cutoff_len: int, what: str, stats: dict[str, Any]) -> Any:
    """Log truncated and dropped examples, remove the dropped ones, fill `stats`, drop the fact columns."""
    dropped = [i for i, reason in enumerate(encoded["dropped"]) if reason]
    truncated = sum(encoded["truncated"])
    # lengths before cutoff_len and content digests count every example, the rest only the kept ones
    facts = {name: encoded[name] for name in BEFORE_DROPS}
    if truncated:
        logger.warning(
            "%s: %d of %d %s exceed cutoff_len=%d and were truncated.",
            split,
            truncated,
            len(encoded),
            what,
            cutoff_len,
        )
    if dropped:
        logger.warning(
            "%s: dropped %d %s that do not fit cutoff_len=%d (e.g. %d: %s). Raise cutoff_len to keep them.",
            split,
            len(dropped),
            what,
            cutoff_len,
            dropped[0],
            encoded[dropped[0]]["dropped"],
        )
        dropped_set = set(dropped)
        encoded = encoded.select([i for i in range(len(encoded)) if i not in dropped_set])
    if len(encoded) == 0:
        raise SftflowError(f"{split}: no example fits cutoff_len={cutoff_len}; raise cutoff_len.")
    facts.update({name: encoded[name] for name in FACT_COLUMNS if name not in BEFORE_DROPS})
    stats.update(summarize(facts, truncated=truncated, dropped=len(dropped)))
    return encoded.remove_columns(["truncated", "dropped", *FACT_COLUMNS])


def tokenize_sft(
    conversations: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    data: DataArguments,
    stop_ids: set[int],
    split: str,
    stats: dict[str, Any] | None = None,
    vision: Vision | None = None,
) -> Any:
    """Tokenize conversations into input_ids/labels; log truncated and dropped examples and fill `stats`
    (see `audit.summarize`). A stream is tokenized lazily, uncounted. With `vision`, each `<image>`
    becomes the model's image run and the rows keep their `images` (see `vision.py`).

    Raises:
        SftflowError: no example fits cutoff_len, one keeps no trained token, or rows have images and
            the model is text-only.
    """
    from datasets import IterableDataset

    thinking = resolve_thinking(tokenizer, data.enable_thinking, data.preserve_thinking)
    streamed = isinstance(conversations, IterableDataset)
    if vision is None and not streamed:
        _refuse_images(conversations, split)

    def encode(row: dict) -> dict:
        messages = row["messages"]
        images = row.get("images") or []
        if images and vision is None:
            _refuse_images(None, split)
        counts: list[int] = []
        if images:
            counts = image_counts(vision, images, split)
        enc = encode_sft(
            tokenizer,
            vision.expand(messages, counts) if images else messages,
            data.cutoff_len,
            data.train_on_prompt,
            stop_ids,
            mask_history=data.mask_history,
            cutoff_policy=data.cutoff_policy,
            thinking=thinking,
        )
        if vision is not None:
            enc = mask_images(enc, vision, counts)
        out = {
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "truncated": enc.truncated,
            "dropped": enc.dropped,
        }
        if vision is not None:
            out["images"] = images
        if "kto_tag" in row:  # kto: whether the trained answer is desirable
            out["label"] = row["kto_tag"]
        if streamed:
            return out
        return {
            **out,
            **_trained_facts(enc.labels, stop_ids),
            "thought": has_thought(messages, words),
            "length": len(enc.input_ids),
            "full_length": enc.full_length,
            "key": _digest([messages, images] if images else messages),
            "prompt_key": _digest([messages[:-1], images] if images else messages[:-1]),
            "answer_key": _digest(messages[-1]["content"]),
        }

    words = (thinking.open, thinking.close) if thinking else None
    if streamed:
        encoded = conversations.map(encode, remove_columns=conversations.column_names)
        encoded = encoded.filter(lambda reason: not reason, input_columns="dropped")
        return encoded.remove_columns(["truncated", "dropped"])
    encoded = conversations.map(
        encode,
        remove_columns=conversations.column_names,
        num_proc=_num_proc(data, conversations),
        desc=f"Tokenizing {split}",
        # the datasets map cache knows the image paths, not their content: image rows are always re-read
        load_from_cache_file=vision is None,
    )
    stats = stats if stats is not None else {}
    thoughts = sum(encoded["thought"])  # rows read, before drops
    encoded = _drop_and_count(encoded.remove_columns("thought"), split, data.cutoff_len, "examples", stats)
    if thoughts or thinking is not None:
        stats["thoughts"] = {"with": thoughts, "without": len(conversations) - thoughts}
    no_labels = sum(1 for labels in encoded["labels"] if all(t == IGNORE_INDEX for t in labels))
    if no_labels:
        raise SftflowError(
            f"{split}: {no_labels} examples have no trained token after truncation; raise cutoff_len."
        )
    return encoded


def image_counts(vision: Vision, refs: list[str], split: str) -> list[int]:
    """The image tokens of each image of a row (`Vision.token_counts`).

    Raises:
        SftflowError: an image has become unreadable since its row was read.
    """
    try:
        return vision.token_counts(vision.pixels([vision.load(ref) for ref in refs]))
    except ImageError as exc:
        raise SftflowError(f"{split}: {exc}; fix or restore it.") from None


def _refuse_images(conversations: Dataset | None, split: str) -> None:
    """Stop when rows have images and the model is text-only."""
    if conversations is not None:
        if "images" not in conversations.column_names:
            return
        with_images = sum(1 for refs in conversations["images"] if refs)
        if not with_images:
            return
    raise SftflowError(
        f"{split}: {'some' if conversations is None else with_images} rows have images, but the model is "
        "text-only (its config.json has no vision_config) or this command does not feed images yet (train, "
        f"preview and preprocess do); image fine-tuning supports model types {', '.join(sorted(FAMILIES))}."
    )


def tokenize_texts(
    texts: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    data: DataArguments,
    split: str,
    stats: dict[str, Any] | None = None,
) -> Any:
    """Turn a `text` dataset into cutoff_len rows of `input_ids`/`labels` (`encode_pretrain`, batched:
    rows do not cross batches of 1000 texts), every token trained. A stream is tokenized lazily.

    Raises:
        SftflowError: the texts hold no token.
    """
    from datasets import IterableDataset

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return encode_pretrain(tokenizer, batch["text"], data.cutoff_len)

    if isinstance(texts, IterableDataset):
        return texts.map(encode, batched=True, remove_columns=["text"])
    rows = texts.map(
        encode,
        batched=True,
        remove_columns=texts.column_names,
        num_proc=_num_proc(data, texts),
        desc=f"Tokenizing {split}",
    )
    if len(rows) == 0:
        raise SftflowError(f"{split}: the texts hold no token.")
    lengths = [len(ids) for ids in rows["input_ids"]]
    if stats is not None:
        stats.update(summarize({"length": lengths, "n_trained": lengths}, truncated=0, dropped=0))
        stats["texts"] = len(texts)
    logger.info(
        "%s: %d texts -> %d tokens in %d rows of <= %d",
        split,
        len(texts),
        sum(lengths),
        len(rows),
        data.cutoff_len,
    )
    return rows


def tokenize_pairs(
    pairs: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    data: DataArguments,
    stop_ids: set[int],
    split: str,
    stats: dict[str, Any] | None = None,
) -> Any:
    """Tokenize pairs with `encode_pairwise`: `chosen_ids`/`rejected_ids` (the whole rendered
    conversations, what rm scores), `prompt_len` (their shared prompt) and `chosen_end`/`rejected_end`
    (the end of each trained answer, through its end-of-turn token: what dpo scores). `row` is the index
    in `pairs`. Over-long pairs follow cutoff_policy; truncations and drops are logged and counted in
    `stats` (lengths over both sequences of a pair).

    Raises:
        SftflowError: no pair fits cutoff_len.
    """

    thinking = resolve_thinking(tokenizer, data.enable_thinking, data.preserve_thinking)

    def encode(row: dict, index: int) -> dict:
        enc = encode_pairwise(
            tokenizer,
            row["messages"],
            row["chosen"],
            row["rejected"],
            data.cutoff_len,
            stop_ids,
            cutoff_policy=data.cutoff_policy,
            thinking=thinking,
        )
        kept = not enc.dropped
        chosen_facts = _trained_facts(enc.chosen_labels, stop_ids)
        rejected_facts = _trained_facts(enc.rejected_labels, stop_ids)
        return {
            "chosen_ids": enc.chosen_input_ids,
            "rejected_ids": enc.rejected_input_ids,
            "prompt_len": _first_trained(enc.chosen_labels) if kept else 0,
            "chosen_end": _last_trained(enc.chosen_labels) + 1 if kept else 0,
            "rejected_end": _last_trained(enc.rejected_labels) + 1 if kept else 0,
            "row": index,
            "truncated": enc.truncated,
            "dropped": enc.dropped,
            "length": max(len(enc.chosen_input_ids), len(enc.rejected_input_ids)),
            "full_length": enc.full_length,
            "n_trained": chosen_facts["n_trained"] + rejected_facts["n_trained"],
            "eot_trained": chosen_facts["eot_trained"] and rejected_facts["eot_trained"],
            "empty": chosen_facts["empty"] or rejected_facts["empty"],
            "key": _digest([row["messages"], row["chosen"], row["rejected"]]),
            "prompt_key": _digest(row["messages"]),
            "answer_key": _digest([row["chosen"], row["rejected"]]),
        }

    encoded = pairs.map(
        encode,
        with_indices=True,
        remove_columns=pairs.column_names,
        num_proc=_num_proc(data, pairs),
        desc=f"Tokenizing {split} pairs",
    )
    return _drop_and_count(encoded, split, data.cutoff_len, "pairs", stats if stats is not None else {})


def _first_trained(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)


def _last_trained(labels: list[int]) -> int:
    return max(i for i, t in enumerate(labels) if t != IGNORE_INDEX)


def tokenize_prompts(
    conversations: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cutoff_len: int,
    thinking: Thinking | None = None,
    vision: Vision | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Prompt-only inputs for generation, sorted longest first (less padding, early OOM), and the
    matching rows (prompt text, reference answer, dataset index) in the same order. With `thinking`
    (`resolve_thinking`) the prompts are in its mode (enable_thinking false: the empty thought block
    ends the prompt) and the reference is split: `label` is the answer, `label_reasoning` its thought
    (None without one, and always with enable_thinking false). With `vision` the prompts' `<image>`s
    become image runs and the inputs keep their `images`.

    Raises:
        SftflowError: every prompt exceeds cutoff_len.
    """
    from datasets import Dataset

    rows, ids, images = [], [], []
    refs_column = conversations["images"] if "images" in conversations.column_names else None
    for k, messages in enumerate(conversations["messages"]):
        refs = refs_column[k] if refs_column is not None else []
        if refs and vision is None:
            _refuse_images(None, "predict")
        shown = messages  # the prompt text written beside the answers keeps its <image> placeholders
        if refs:
            messages = vision.expand(messages, image_counts(vision, refs, "predict"))
        prompt_ids = encode_prompt(tokenizer, messages, cutoff_len, thinking)
        if prompt_ids is None:
            continue
        ids.append(prompt_ids)
        images.append(refs)
        label, thought = messages[-1]["content"], None
        if thinking is not None:
            thought, label = split_thought(label, (thinking.open, thinking.close))
            thought = None if thinking.enable is False else thought
        row = {
            "prompt": render(tokenizer, shown[:-1], add_generation_prompt=True)
            if thinking is None
            else thinking_prompt(tokenizer, shown, thinking),
            "label": label,
            "index": len(rows),
        }
        if thinking is not None:
            row["label_reasoning"] = thought
        rows.append(row)
    if not ids:
        raise SftflowError(f"predict: every prompt exceeds cutoff_len={cutoff_len}; raise cutoff_len.")
    if len(ids) < len(conversations):
        logger.warning("predict: skipped %d prompts longer than cutoff_len.", len(conversations) - len(ids))
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    columns: dict[str, list] = {"input_ids": [ids[i] for i in order]}
    if vision is not None:
        columns["images"] = [images[i] for i in order]
    return Dataset.from_dict(columns), [rows[i] for i in order]


def grpo_prompt_text(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], thinking: Thinking | None
) -> str:
    """The generation prompt of a grpo prompt conversation (it ends with a user or tool turn), as predict
    renders it: the template's generation prompt, in the thinking mode (enable_thinking false or null: the
    empty thought block ends it)."""
    if thinking is None:
        return render(tokenizer, messages, add_generation_prompt=True)
    return thinking_prompt(tokenizer, [*messages, {"role": "assistant", "content": ""}], thinking)


def tokenize_grpo(
    prompts: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    data: DataArguments,
    split: str,
    stats: dict[str, Any] | None = None,
) -> Any:
    """grpo prompts -> `prompt` (the rendered generation prompt, tokenized again by the trainer without
    special tokens) and `extra` (the JSON of the rewards' extra columns). Prompts longer than cutoff_len are
    dropped and counted; `stats` gets the prompt lengths and duplicates (conflicting: a prompt repeated with
    other extra columns).

    Raises:
        SftflowError: no prompt fits cutoff_len.
    """
    thinking = resolve_thinking(tokenizer, data.enable_thinking, data.preserve_thinking)

    def encode(row: dict) -> dict:
        text = grpo_prompt_text(tokenizer, row["messages"], thinking)
        length = len(tokenizer.encode(text, add_special_tokens=False))
        return {
            "prompt": text,
            "extra": row["extra"],
            "length": length,
            "key": _digest([row["messages"], row["extra"]]),
            "prompt_key": _digest(row["messages"]),
            "answer_key": _digest(row["extra"]),
        }

    encoded = prompts.map(
        encode,
        remove_columns=prompts.column_names,
        num_proc=_num_proc(data, prompts),
        desc=f"Rendering {split} prompts",
    )
    lengths = encoded["length"]
    digests = {name: encoded[name] for name in ("key", "prompt_key", "answer_key")}
    kept = [i for i, n in enumerate(lengths) if n <= data.cutoff_len]
    if not kept:
        raise SftflowError(f"{split}: no prompt fits cutoff_len={data.cutoff_len}; raise cutoff_len.")
    if len(kept) < len(encoded):
        logger.warning(
            "%s: dropped %d of %d prompts longer than cutoff_len=%d. Raise cutoff_len to keep them.",
            split,
            len(encoded) - len(kept),
            len(encoded),
            data.cutoff_len,
        )
        encoded = encoded.select(kept)
    if stats is not None:
        kept_lengths = [lengths[i] for i in kept]
        facts = {"length": kept_lengths, "n_trained": [0] * len(kept), "full_length": lengths, **digests}
        stats.update(summarize(facts, truncated=0, dropped=len(lengths) - len(kept)))
    return encoded.remove_columns(["length", *digests])
