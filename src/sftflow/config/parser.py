"""Read a YAML/JSON config plus `key=value` overrides into the five typed argument classes.

Every key is checked against the fields of all classes before anything heavy happens: unknown keys and
values of the wrong type are refused with the key's name and the closest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import inspect
import json
import logging
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sftflow.config.args import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
from sftflow.config.coerce import coerce, type_name
from sftflow.config.compat import ALIASES, refusal, resolve_compat
from sftflow.config.files import check_config_files
from sftflow.config.methods import check_stage_name
from sftflow.config.refused import REFUSED
from sftflow.config.validate import check_effect, check_ranges, check_stage, check_training
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from collections.abc import Collection

    from transformers import Seq2SeqTrainingArguments


__all__ = ["RunArgs", "args_from_dict", "field_docs", "help_text", "load_args"]

SFTFLOW_CLASSES = (ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments)

# sftflow's defaults for HF training keys, applied only when the config does not set them.
TRAINING_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "logging_steps": 5,
    "save_strategy": "no",
    "include_num_input_tokens_seen": "non_padding",  # gives train_tokens_per_second (non-pad)
    "remove_unused_columns": False,  # our datasets already hold only model inputs
    "dataloader_pin_memory": False,
}


@dataclass
class RunArgs:
    """All arguments of one run, grouped as the workflow uses them."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    generating: GeneratingArguments
    training: Any  # transformers.Seq2SeqTrainingArguments (imported lazily: it pulls torch)
    user_keys: dict[str, Any]

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved sftflow arguments plus the training keys the user set, for sftflow_args.yaml."""
        out: dict[str, Any] = {}
        for group in (self.model, self.data, self.finetuning, self.generating):
            out.update(dataclasses.asdict(group))
        training = self.training.to_dict()
        for key in [*TRAINING_DEFAULTS, *self.user_keys]:
            if key in training and key not in out:
                out[key] = training[key]
        return out


# Third-party loggers that speak at import time about things sftflow does not use: bitsandbytes' CPU
# backend warns on every import when the optional `kernels` package is missing, and `import peft` and the
# HF Trainer import bitsandbytes whenever it is installed.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def quiet_import_noise() -> None:
    """Raise QUIET_LOGGERS to ERROR. Called before transformers is first imported (every command parses
    its config first) and again by the CLI's setup_logging."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# string training keys whose words transformers does not check when it builds the arguments
KEYWORD_STRINGS = {
    "include_num_input_tokens_seen": ("no", "all", "non_padding"),
    "torch_compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


def training_args_class() -> type:
    quiet_import_noise()
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments


def all_classes() -> tuple[type, ...]:
    return (*SFTFLOW_CLASSES, training_args_class())


def field_index() -> dict[str, tuple[type, dataclasses.Field]]:
    """Map each config key to (class, field). Public fields only (HF keeps some private `_` ones)."""
    index: dict[str, tuple[type, dataclasses.Field]] = {}
    for cls in all_classes():
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                index.setdefault(f.name, (cls, f))
    return index


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a flat dict.

    Raises:
        SftflowError: the file is missing, unparsable, or not a mapping of keys to values.
    """
    path = Path(path)
    if path.is_dir():
        raise SftflowError(
            f"{path} is a directory; give a YAML/JSON config file (chat, api and predict also take a run dir)."
        )
    if not path.is_file():
        raise SftflowError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SftflowError(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SftflowError(
            f"{path} must hold `key: value` pairs at the top level, found a {type(data).__name__}."
        )
    return data


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """Turn `["key=value", ...]` into a dict of raw strings (typed later by the field)."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SftflowError(f"override {item!r} is not of the form key=value (e.g. learning_rate=1e-4).")
        out[key.strip()] = value.strip()
    return out


def unknown_key_message(key: str, known: list[str]) -> str:
    if key in REFUSED:
        return refusal(key)
    if key in ALIASES:
        return f"{key} means {ALIASES[key].target}; write {ALIASES[key].target}."
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else " Run `sftflow train --help` for the list of keys."
    return f"unknown key {key!r}.{hint}"


def resolved_hints(cls: type) -> dict[str, Any]:
    """The field types of dataclass `cls`, resolved from their string annotations where possible."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # some HF hints name types we cannot resolve; fall back to raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def load_args(
    config_path: str | Path | None, overrides: list[str] | None = None, require_output_dir: bool = True
) -> RunArgs:
    """Build the run's arguments from a config file and `key=value` overrides (overrides win).

    Raises:
        SftflowError: unknown keys, values of the wrong type or out of range, missing required keys.
    """
    raw: dict[str, Any] = read_config_file(config_path) if config_path else {}
    raw.update(parse_overrides(overrides or []))
    return args_from_dict(raw, require_output_dir)


def args_from_dict(
    raw: dict[str, Any], require_output_dir: bool = True, recorded: Collection[str] = ()
) -> RunArgs:
    """Build the run's arguments from a flat `key: value` dict (YAML values or raw override strings).

    `require_output_dir`: only commands that write a run (train) need one. LLaMA-Factory and older
    transformers keys are mapped or refused first (config/compat.py). `recorded`: keys read back from a
    finished run's sftflow_args.yaml (every resolved value, e.g. a full run's lora_alpha); they describe
    what ran, so they are not refused as having no effect, while the keys the user sets still are.

    Raises:
        SftflowError: unknown or refused keys, values of the wrong type or out of range, missing required
            keys, settings transformers would refuse later (checked here, before any model loads).
    """
    index = field_index()
    known = sorted(index)
    problems = [
        unknown_key_message(k, known) for k in raw if k not in index | ALIASES.keys() | REFUSED.keys()
    ]
    try:
        raw = resolve_compat(
            {k: v for k, v in raw.items() if k in index | ALIASES.keys() | REFUSED.keys()}, index
        )
    except SftflowError as exc:
        problems.append(str(exc))
    if problems:
        raise SftflowError("\n".join(problems))
    check_stage_name(raw.get("stage"))  # ppo: the reason, not "did you mean 'dpo'"

    per_class: dict[type, dict[str, Any]] = {cls: {} for cls in all_classes()}
    hints = {cls: resolved_hints(cls) for cls in all_classes()}
    for key, value in raw.items():
        cls, f = index[key]
        try:
            per_class[cls][key] = coerce(hints[cls].get(key, f.type), value)
            # HF's argparse choices (log_level, ddp_backend, ...) and the words HF checks only later
            choices = list(f.metadata.get("choices") or KEYWORD_STRINGS.get(key, ()))
            if choices and isinstance(per_class[cls][key], str):
                coerce(typing.Literal[tuple(choices)], per_class[cls][key])
        except ValueError as exc:
            raise SftflowError(f"bad value for {key}: {exc}") from None

    if not raw.get("model_name_or_path"):
        raise SftflowError("model_name_or_path is required (e.g. model_name_or_path: smollm2-135m-instruct).")
    if require_output_dir and not raw.get("output_dir"):
        raise SftflowError("output_dir is required (e.g. output_dir: saves/my-run).")

    training_cls = training_args_class()
    groups = []
    for cls in SFTFLOW_CLASSES:
        groups.append(cls(**per_class[cls]))
    training = build_training_args(per_class[training_cls])
    model, data, finetuning, generating = groups
    check_ranges(model, data, finetuning, generating, training)
    _check_together(model, data, finetuning, training)
    user = {k: v for k, v in raw.items() if k not in recorded}
    check_effect(user, model, data, finetuning, generating, training)
    return RunArgs(model, data, finetuning, generating, training, user_keys=raw)


def implied_training_keys(user: dict[str, Any]) -> dict[str, Any]:
    """Training keys implied by others the user set: `save_steps` alone checkpoints (save_strategy: steps,
    as in the HF Trainer and LLaMA-Factory, where steps is the default) and `eval_steps` alone evaluates."""
    implied: dict[str, Any] = {}
    if "save_steps" in user and "save_strategy" not in user:
        implied["save_strategy"] = "steps"
    if "eval_steps" in user and "eval_strategy" not in user:
        implied["eval_strategy"] = "steps"
    return implied


def build_training_args(user: dict[str, Any]) -> Any:
    """Seq2SeqTrainingArguments from sftflow's defaults, the implied keys and the user's typed keys.

    Raises:
        SftflowError: transformers refuses the values; the message names the key that fails alone (or the
            keys its message names).
    """
    cls = training_args_class()
    base = {**TRAINING_DEFAULTS, **implied_training_keys(user)}
    check_config_files(user)
    try:
        return cls(**{**base, **user})
    except (ValueError, TypeError, ImportError) as exc:
        culprits = []
        for key in sorted(user):
            try:
                cls(**{**base, key: user[key]})
            except (ValueError, TypeError, ImportError):
                culprits.append(key)
        if not culprits:
            culprits = [key for key in sorted(user) if key in str(exc)] or sorted(user)
        raise SftflowError(f"invalid training arguments ({', '.join(culprits)}): {exc}") from None


def _check_together(
    model: ModelArguments,
    data: DataArguments,
    finetuning: FinetuningArguments,
    training: Seq2SeqTrainingArguments,
) -> None:
    """Checks that involve more than one group."""
    if model.quantization_bit is not None and finetuning.finetuning_type != "lora":
        raise SftflowError(
            "quantization_bit needs finetuning_type: lora (quantized weights cannot be trained directly)."
        )
    if training.do_train and not data.dataset:
        raise SftflowError("do_train is set but no dataset is given (e.g. dataset: my_data).")
    if (training.do_eval or training.do_predict) and not (data.eval_dataset or data.val_size):
        raise SftflowError(
            "do_eval/do_predict need held-out data: set eval_dataset (a dataset name) or val_size (e.g. 0.1)."
        )
    check_training(training)
    check_stage(model, data, finetuning, training)
    if training.do_predict and finetuning.stage == "sft" and not training.predict_with_generate:
        raise SftflowError(
            "do_predict needs predict_with_generate: true (sftflow predicts by generating answers)."
        )


def field_docs(cls: type) -> dict[str, str]:
    """Field documentation: the string literal under each field (ours) or `metadata['help']` (HF's)."""
    docs = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    """Every config key with its type, default and one-line doc, grouped by class."""
    lines = ["Config keys (YAML/JSON file or key=value overrides):"]
    for cls in all_classes():
        lines.append(f"\n[{cls.__name__}]")
        docs = field_docs(cls)
        hints = resolved_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            if cls is training_args_class() and f.name in TRAINING_DEFAULTS:
                default = f"{TRAINING_DEFAULTS[f.name]} (sftflow default)"
            if isinstance(default, enum.Enum):
                default = default.value
            doc = (docs.get(f.name) or "").split(". ")[0].strip()
            lines.append(f"  {f.name} ({type_name(hints.get(f.name, f.type))}, default: {default})")
            if doc:
                lines.append(f"      {doc}")
    lines.append("\n[LLaMA-Factory and older transformers keys] (docs/llamafactory.md)")
    lines.append("  aliases: " + ", ".join(f"{key} -> {alias.target}" for key, alias in ALIASES.items()))
    lines.append(f"  {len(REFUSED)} more are refused with the reason and what to use instead.")
    return "\n".join(lines)
