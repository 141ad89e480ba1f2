"""Keys from LLaMA-Factory configs and from older transformers releases: each is an alias of a sftflow key
or refused with the reason and what to write instead, never silently ignored.

docs/llamafactory.md lists every LLaMA-Factory key with its status; tests/test_llamafactory_compat.py
checks that table against ALIASES and REFUSED (the refused keys and their reasons: refused.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sftflow.config.coerce import coerce
from sftflow.config.refused import REFUSED
from sftflow.errors import SftflowError

DROP = object()  # an alias value that sets nothing (pure_bf16: false)


@dataclass(frozen=True)
class Alias:
    """`key` means `target` (after `convert`, which raises ValueError on a bad value)."""

    target: str
    note: str = ""
    convert: Callable[[Any], Any] | None = None


def _ratio(value: Any) -> float:
    ratio = coerce(float, value)
    if not 0 <= ratio < 1:
        raise ValueError(
            f"warmup_ratio must be in [0, 1), got {value!r} (it becomes warmup_steps, where a value < 1 is a "
            "ratio; for a warmup over the whole run give warmup_steps the total number of steps)"
        )
    return ratio


def _words(mapping: dict[Any, Any]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        key = str(value).lower()
        for word, target in mapping.items():
            if str(word).lower() == key:
                if isinstance(target, Exception):
                    raise target
                return target
        raise ValueError(f"expected one of {', '.join(map(str, mapping))}, got {value!r}")

    return convert


def _negated(value: Any) -> bool:
    return not coerce(bool, value)


def _pure_bf16(value: Any) -> Any:
    return "bfloat16" if coerce(bool, value) else DROP


def _use_reentrant(value: Any) -> dict[str, bool]:
    return {"use_reentrant": coerce(bool, value)}


ALIASES: dict[str, Alias] = {
    # transformers keys renamed or folded into another key by later releases
    "warmup_ratio": Alias(
        "warmup_steps",
        "a ratio in [0, 1) (removed by transformers 5.15, whose warmup_steps < 1 is a ratio)",
        _ratio,
    ),
    "evaluation_strategy": Alias("eval_strategy", "renamed by transformers 4"),
    "no_cuda": Alias("use_cpu", "renamed by transformers 4"),
    "per_gpu_train_batch_size": Alias("per_device_train_batch_size", "renamed by transformers 4"),
    "per_gpu_eval_batch_size": Alias("per_device_eval_batch_size", "renamed by transformers 4"),
    "push_to_hub_model_id": Alias("hub_model_id", "renamed by transformers 4"),
    "push_to_hub_token": Alias("hub_token", "renamed by transformers 4"),
    "torchdynamo": Alias("torch_compile_backend", "renamed by transformers 4"),
    "group_by_length": Alias(
        "train_sampling_strategy",
        "true -> group_by_length, false -> random (transformers 5)",
        _words({True: "group_by_length", False: "random"}),
    ),
    "torch_dtype": Alias("dtype", "renamed by transformers 4.56"),
    # LLaMA-Factory keys that sftflow spells differently
    "infer_dtype": Alias("dtype", "one dtype for training and inference"),
    "add_special_tokens": Alias("new_special_tokens", "the same comma-separated list"),
    "flash_attn": Alias(
        "attn_implementation",
        "auto/sdpa -> sdpa, fa2 -> flash_attention_2, disabled -> eager",
        _words(
            {
                "auto": "sdpa",
                "sdpa": "sdpa",
                "fa2": "flash_attention_2",
                "disabled": "eager",
                "fa3": ValueError("fa3 is not supported; use flash_attn: fa2 or sdpa"),
            }
        ),
    ),
    "enable_liger_kernel": Alias("use_liger_kernel", "transformers' own Liger switch"),
    "disable_gradient_checkpointing": Alias(
        "gradient_checkpointing",
        "negated (LLaMA-Factory checkpoints by default, sftflow only when asked)",
        _negated,
    ),
    "use_reentrant_gc": Alias("gradient_checkpointing_kwargs", "{use_reentrant: <value>}", _use_reentrant),
    "tokenized_path": Alias(
        "tokenized_cache_dir",
        "the tokenized data is saved there and reused while data, tokenizer and settings match",
    ),
    "neat_packing": Alias(
        "packing",
        "sftflow's packing never lets packed examples attend to each other",
        _words({True: True, False: DROP}),
    ),
    "eval_num_beams": Alias("num_beams", "the beam width of predict"),
    "pure_bf16": Alias("dtype", "true -> dtype: bfloat16 (weights in bf16, no mixed precision)", _pure_bf16),
}


def _matches(value: Any, accepted: Any) -> bool:
    if accepted is None:
        return value is None or (isinstance(value, str) and value.strip().lower() in ("null", "~", "none"))
    if value is None:
        return False
    if isinstance(accepted, bool):
        try:
            return coerce(bool, value) is accepted
        except ValueError:
            return False
    if isinstance(accepted, (int, float)):
        try:
            return coerce(float, value) == accepted
        except ValueError:
            return False
    return str(value).lower() == str(accepted).lower()


def refusal(key: str) -> str:
    """The one-line message for a refused key (the reason in docs/llamafactory.md)."""
    return f"{key}: {REFUSED[key].reason}."


def resolve_compat(raw: dict[str, Any], fields: Collection[str]) -> dict[str, Any]:
    """Rewrite aliases to their sftflow key and drop refused keys set to a value sftflow honours anyway.
    Keys in `fields` (sftflow's own keys) pass unchanged, also when a table entry names them.

    Raises:
        SftflowError: a refused key with another value, an alias with a bad value, or an alias and its
            target both set. Every problem is listed, one per line.
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        if key in fields or key not in ALIASES | REFUSED:
            out[key] = value
        elif key in REFUSED:
            if not any(_matches(value, accepted) for accepted in REFUSED[key].accepted):
                problems.append(refusal(key))
        elif (target := ALIASES[key].target) in raw or target in out:
            problems.append(f"{key} and {target} are both set; {key} means {target}, keep one.")
        else:
            try:
                converted = ALIASES[key].convert(value) if ALIASES[key].convert else value
            except ValueError as exc:
                problems.append(f"bad value for {key}: {exc}")
                continue
            if converted is not DROP:
                out[target] = converted
    if problems:
        raise SftflowError("\n".join(problems))
    return out
