"""The board's config form: generated from the config dataclasses, round-trips with YAML for every key,
and refuses bad values with the CLI's own messages."""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, Literal, Union

import pytest

from sftflow.board import form
from sftflow.config.coerce import coerce
from sftflow.config.parser import field_index
from sftflow.errors import SftflowError


def sample(field: form.FormField) -> Any:
    """A typed value for `field` that differs from its default."""
    if field.kind == "bool":
        return not field.default
    if field.kind == "choice":
        return next(c for c in field.choices if c != field.default)
    tp = field.type
    options = (
        [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp)
        in (
            Union,
            types.UnionType,
        )
        else [tp]
    )
    first = options[0]
    origin = typing.get_origin(first)
    if first is bool:
        return field.default != "true"
    if first is int:
        return int(field.default or 0) + 3
    if first is float:
        return float(field.default or 0) + 0.25
    if origin is list:
        return [0.25, 0.75] if typing.get_args(first)[0] is float else ["alpha", "beta"]
    if first is dict or origin is dict:
        return {"alpha": 1}
    if isinstance(first, type) and issubclass(first, enum.Enum):
        return next(m.value for m in first if m.value != field.default)
    if typing.get_origin(first) is Literal:
        return next(a for a in typing.get_args(first) if a != field.default)
    return f"x-{field.key}"


def test_every_config_key_is_a_form_field_with_its_doc():
    keys = [f.key for f in form.fields()]
    assert sorted(keys) == sorted(field_index())
    assert len(keys) == len(set(keys))
    by_key = {f.key: f for f in form.fields()}
    assert by_key["lora_rank"].group == "Finetuning" and by_key["lora_rank"].default == "8"
    assert by_key["lora_rank"].doc == "LoRA rank r."
    assert by_key["stage"].kind == "choice" and {"pt", "sft", "rm", "dpo"} <= set(by_key["stage"].choices)
    assert by_key["packing"].kind == "bool" and by_key["packing"].default is False
    assert by_key["learning_rate"].group == "Training" and by_key["learning_rate"].doc
    assert by_key["logging_steps"].default == "5"  # sftflow's own default, not HF's
    assert by_key["lr_scheduler_type"].custom and "cosine" in by_key["lr_scheduler_type"].choices


def test_defaults_give_no_keys():
    assert form.form_to_keys(form.defaults()) == {}


def cli_reads(field: form.FormField, value: Any) -> bool:
    """Whether the CLI reads `value` for this key (a few HF keys hold objects no config can give)."""
    try:
        coerce(field.type, value)
    except (ValueError, TypeError):
        return False
    return True


@pytest.mark.parametrize("field", form.fields(), ids=lambda f: f.key)
def test_form_yaml_round_trip_for_every_key(field):
    keys = {field.key: sample(field)}
    if not cli_reads(field, keys[field.key]):  # then the form refuses it with the CLI's message
        with pytest.raises(SftflowError, match=f"bad value for {field.key}"):
            form.keys_to_form(keys)
        return
    text = form.keys_to_yaml(keys)
    values = form.keys_to_form(form.yaml_to_keys(text))
    assert form.form_to_keys(values) == keys
    assert form.keys_to_form(form.form_to_keys(values)) == values


def test_all_keys_at_once_round_trip():
    keys = {f.key: sample(f) for f in form.fields() if cli_reads(f, sample(f))}
    assert len(keys) > 150
    values = form.keys_to_form(form.yaml_to_keys(form.keys_to_yaml(keys)))
    assert form.form_to_keys(values) == keys


def test_bad_values_give_the_cli_message():
    by_key = {f.key: i for i, f in enumerate(form.fields())}
    values = form.defaults()
    values[by_key["lora_rank"]] = "eight"
    with pytest.raises(SftflowError, match="bad value for lora_rank: expected an integer"):
        form.form_to_keys(values)
    with pytest.raises(SftflowError, match="unknown key 'learnig_rate'. Did you mean 'learning_rate'"):
        form.keys_to_form({"learnig_rate": 1e-4})
    with pytest.raises(SftflowError, match="bad value for stage"):
        form.keys_to_form({"stage": "ppo"})
    with pytest.raises(SftflowError, match="top level"):
        form.yaml_to_keys("- a\n- b\n")
    with pytest.raises(SftflowError, match="lora_rank must be >= 1"):
        form.check_keys({"model_name_or_path": "m", "output_dir": "o", "lora_rank": 0})


def test_llamafactory_keys_fill_the_form_as_the_cli_reads_them():
    values = form.keys_to_form({"evaluation_strategy": "steps", "warmup_ratio": 0.1})
    assert form.form_to_keys(values) == {"warmup_steps": 0.1, "eval_strategy": "steps"}


def test_a_cli_runs_resolved_config_fills_the_form():
    values = form.keys_to_form({"report_to": [], "lora_target": ["q_proj", "v_proj"], "lora_alpha": 16})
    keys = form.form_to_keys(values)
    assert keys == {"lora_alpha": 16, "lora_target": ["q_proj", "v_proj"], "report_to": []}
    assert form.check_keys({**keys, "model_name_or_path": "m", "output_dir": "o"}).training.report_to == []
