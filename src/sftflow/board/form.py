"""The config form, generated from the same dataclasses as `sftflow train --help`.

Every config key is one FormField: grouped by its class, with its default and one-line doc. A form value
is what a widget holds (a bool for a checkbox, a choice, else text as a user types it on the CLI:
`q_proj, v_proj`, `1e-4`, `{"a": 1}`; empty = unset). `form_to_keys` turns the values into the keys a CLI
user would write (those that differ from the default), `keys_to_form` the other way, so form and YAML
round-trip. Bad values raise the CLI's own SftflowError messages.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

from sftflow.config.coerce import coerce
from sftflow.config.compat import ALIASES, resolve_compat
from sftflow.config.parser import (
    SFTFLOW_CLASSES,
    TRAINING_DEFAULTS,
    all_classes,
    args_from_dict,
    field_docs,
    resolved_hints,
    unknown_key_message,
)
from sftflow.config.refused import REFUSED
from sftflow.errors import SftflowError

# Training keys shown open; the other HF training keys sit in a closed "more" section.
COMMON_TRAINING = (
    "output_dir",
    "do_train",
    "do_eval",
    "do_predict",
    "predict_with_generate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "logging_steps",
    "eval_strategy",
    "eval_steps",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "gradient_checkpointing",
    "bf16",
    "fp16",
    "seed",
)
GROUP_TITLES = {
    "ModelArguments": "Model",
    "DataArguments": "Data",
    "FinetuningArguments": "Finetuning",
    "GeneratingArguments": "Generating",
}


@dataclass(frozen=True)
class FormField:
    """One config key as a widget."""

    key: str
    group: str  # Model | Data | Finetuning | Generating | Training | Training (more)
    kind: str  # bool | choice | text
    type: Any  # the annotated type the CLI coerces to
    default: Any  # the widget value of the default
    doc: str
    choices: tuple[str, ...] = ()
    custom: bool = False  # a choice that also takes other text (HF `SomeEnum | str` keys)


def _enum_of(tp: Any) -> type[enum.Enum] | None:
    """The Enum of an `SomeEnum | str` hint, else None."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    for option in options:
        if isinstance(option, type) and issubclass(option, enum.Enum):
            return option
    return None


def to_text(value: Any) -> str:
    """A value as the CLI's `key=value` text: the inverse of `coerce` for the form's text widgets.

    >>> to_text(None), to_text(True), to_text(["q_proj", "v_proj"]), to_text({"a": 1}), to_text(1e-4)
    ('', 'true', 'q_proj, v_proj', '{"a": 1}', '0.0001')
    """
    if value is None:
        return ""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(to_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # 1.0 -> "1", as a user types it (a float key reads it back as 1.0)
    return str(value)


def _default(cls: type, f: dataclasses.Field) -> Any:
    if cls not in SFTFLOW_CLASSES and f.name in TRAINING_DEFAULTS:
        return TRAINING_DEFAULTS[f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def build_fields() -> list[FormField]:
    """Every config key as a FormField, in `train --help` order, common training keys first."""

    out: list[FormField] = []
    common: list[FormField] = []
    more: list[FormField] = []
    seen: set[str] = set()
    for cls in all_classes():
        docs, hints = field_docs(cls), resolved_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_") or f.name in seen:
                continue
            seen.add(f.name)
            tp = hints.get(f.name, f.type)
            default = _default(cls, f)
            doc = (docs.get(f.name) or "").split(". ")[0].strip()
            group = GROUP_TITLES.get(cls.__name__, "Training")
            found_enum = _enum_of(tp) if cls not in SFTFLOW_CLASSES else None
            if tp is bool:
                field_ = FormField(f.name, group, "bool", tp, bool(default), doc)
            elif typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp)):
                field_ = FormField(f.name, group, "choice", tp, default, doc, typing.get_args(tp))
            elif found_enum is not None:
                choices = tuple(str(m.value) for m in found_enum)
                field_ = FormField(f.name, group, "choice", tp, to_text(default), doc, choices, custom=True)
            else:
                field_ = FormField(f.name, group, "text", tp, to_text(default), doc)
            if group != "Training":
                out.append(field_)
            elif f.name in COMMON_TRAINING:
                common.append(field_)
            else:
                more.append(dataclasses.replace(field_, group="Training (more)"))
    common.sort(key=lambda x: COMMON_TRAINING.index(x.key))
    return out + common + more


_FIELDS: list[FormField] | None = None


def fields() -> list[FormField]:
    """build_fields(), built once (it imports transformers for the training keys)."""
    global _FIELDS
    if _FIELDS is None:
        _FIELDS = build_fields()
    return _FIELDS


def defaults() -> list[Any]:
    return [f.default for f in fields()]


def parse_value(field_: FormField, value: Any) -> Any:
    """A widget value as the typed config value the CLI would read from `key=value`.

    Raises:
        SftflowError: `bad value for KEY: ...`, the CLI's message.
    """

    if field_.kind == "bool":
        return bool(value)
    text = "" if value is None else str(value).strip()
    if field_.kind == "choice" and not field_.custom:
        return text
    if text == "":
        if str(field_.default) != "" and _takes_list(field_.type):
            return []  # emptied on purpose (report_to: none -> no tracker at all)
        return None if _optional(field_.type) else ""
    try:
        return coerce(field_.type, text)
    except (ValueError, TypeError) as exc:
        raise SftflowError(f"bad value for {field_.key}: {exc}") from None


def _takes_list(tp: Any) -> bool:
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return any(typing.get_origin(option) is list for option in options)


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def form_to_keys(values: list[Any]) -> dict[str, Any]:
    """The keys whose widget differs from its default, typed, in form order (what a user writes).

    Raises:
        SftflowError: a value the CLI would refuse to read.
    """
    keys: dict[str, Any] = {}
    for field_, value in zip(fields(), values, strict=True):
        if field_.kind == "text" or field_.custom:
            if ("" if value is None else str(value).strip()) == str(field_.default).strip():
                continue
        elif value == field_.default:
            continue
        keys[field_.key] = parse_value(field_, value)
    return keys


def keys_to_form(keys: dict[str, Any]) -> list[Any]:
    """Widget values for `keys` (unset keys get their default).

    Keys of LLaMA-Factory and older transformers configs are mapped (or refused) as the CLI does.

    Raises:
        SftflowError: an unknown key (with the closest valid one, as the CLI says it), a refused key, or a
            value that does not fit its key.
    """

    by_key = {f.key: f for f in fields()}
    unknown = [k for k in keys if k not in by_key.keys() | ALIASES.keys() | REFUSED.keys()]
    if unknown:
        raise SftflowError("\n".join(unknown_key_message(k, sorted(by_key)) for k in unknown))
    keys = resolve_compat(keys, by_key)  # LLaMA-Factory / older transformers keys, as the CLI reads them
    values = []
    for field_ in fields():
        if field_.key not in keys:
            values.append(field_.default)
            continue
        try:
            value = coerce(field_.type, keys[field_.key])
        except (ValueError, TypeError) as exc:
            raise SftflowError(f"bad value for {field_.key}: {exc}") from None
        values.append(
            value if field_.kind == "bool" or not (field_.kind == "text" or field_.custom) else to_text(value)
        )
    return values


def keys_to_yaml(keys: dict[str, Any]) -> str:
    return yaml.safe_dump(keys, sort_keys=False, allow_unicode=True) if keys else ""


def yaml_to_keys(text: str) -> dict[str, Any]:
    """The YAML editor's text as keys.

    Raises:
        SftflowError: not YAML, or not a mapping of keys to values.
    """
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise SftflowError(f"the YAML is not valid: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SftflowError(
            f"the YAML must hold `key: value` pairs at the top level, found a {type(data).__name__}."
        )
    return data


def check_keys(keys: dict[str, Any]) -> Any:
    """Read `keys` exactly as `sftflow train` reads a config (same checks, same messages).

    Returns:
        The RunArgs.

    Raises:
        SftflowError: what the CLI would print as `sftflow error: ...`.
    """

    return args_from_dict(keys)
