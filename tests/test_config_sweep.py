"""Sweeps over every key of `sftflow train --help`.

- A wrong-typed value and an out-of-range value of each key end in one `sftflow error:` naming the key,
  with no traceback and before anything loads (the stage recipe is never reached).
- A valid non-default value of each key reaches the object that uses it, or the key is refused where
  it has no effect, with a message saying so.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from sftflow.config.coerce import keywords
from sftflow.config.parser import all_classes, args_from_dict, field_index, resolved_hints
from sftflow.config.validate import GRPO_KEYS, RANGES
from sftflow.errors import SftflowError

BASE = {"model_name_or_path": "some/model", "output_dir": "/tmp/sftflow-sweep-out"}


def _fields() -> dict[str, tuple[type, dataclasses.Field, Any]]:
    out = {}
    for cls in all_classes():
        hints = resolved_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_") and f.name not in out:
                out[f.name] = (cls, f, hints.get(f.name, f.type))
    return out


FIELDS = _fields()
KEYS = sorted(FIELDS)


def _options(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _is_numeric(tp: Any) -> bool:
    return any(o in (int, float) for o in _options(tp))


def _keyword_set(key: str) -> list[Any] | None:
    _, f, tp = FIELDS[key]
    if f.metadata.get("choices"):
        return list(f.metadata["choices"])
    if str in _options(tp) and not any(
        isinstance(o, type) and issubclass(o, enum.Enum) for o in _options(tp)
    ):
        return None  # a free string (trackio_static_space_id: str | None | Literal[False])
    for option in _options(tp):
        words = keywords(option)
        if words is not None:
            return words
    return None


def wrong_type(key: str) -> Any:
    """A value of the wrong type for the key (None when every YAML value fits, as for `Any`)."""
    tp = FIELDS[key][2]
    options = _options(tp)
    if tp is Any:
        return None
    if any(typing.get_origin(o) is dict or o is dict for o in options):
        return [1, 2]
    if any(o in (int, float, bool) for o in options) or _keyword_set(key):
        return "not-a-value"
    return {"a": 1}


def out_of_range(key: str) -> Any:
    """A value of the right type outside the key's range (None when every value of the type is valid)."""
    if key in RANGES:
        allowed = RANGES[key]
        if allowed.low is not None:
            return allowed.low - 1
        if allowed.high is not None:
            return allowed.high + 1
        return 0
    if _keyword_set(key):
        return "no-such-choice"
    return None


def test_every_numeric_key_has_a_range():
    numeric = {
        k for k in KEYS if _is_numeric(FIELDS[k][2]) and not any(o is bool for o in _options(FIELDS[k][2]))
    }
    assert numeric - set(RANGES) == set(), "give these keys a Range in config/validate.py RANGES"
    assert set(RANGES) - set(KEYS) <= {"simpo_gamma", "kto_chosen_weight", "kto_rejected_weight"} | (
        set(RANGES) - set(field_index())
    )


CASES = [(k, "wrong type", wrong_type(k)) for k in KEYS if wrong_type(k) is not None] + [
    (k, "out of range", out_of_range(k)) for k in KEYS if out_of_range(k) is not None
]


@pytest.fixture
def no_stage(monkeypatch):
    """The stage recipe (tokenizer, data, model) must never be reached by a refused value."""

    def reached(args: Any) -> None:
        raise AssertionError("the run got past load_args")

    monkeypatch.setattr("sftflow.stages.registry.run_stage", reached)


@pytest.mark.parametrize(("key", "kind", "value"), CASES, ids=[f"{k}-{kind}" for k, kind, _ in CASES])
def test_bad_value_is_one_error_naming_the_key(key, kind, value, tmp_path, capsys, no_stage):
    from sftflow.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out"), key: value}))
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("sftflow error: ") == 1, err[-2000:]
    assert "Traceback" not in err
    message = err[err.index("sftflow error: ") :]
    assert key in message, f"the message does not name {key}: {message}"
    assert not (tmp_path / "out").exists()


def test_the_sweep_covers_every_key_with_a_wrong_type():
    assert {k for k, kind, _ in CASES if kind == "wrong type"} == set(KEYS)
    assert len(CASES) > 300


# ---- a valid non-default value reaches its object, or the key is refused where it has no effect ----

# keys whose value only takes effect together with others (the run's context)
CONTEXT: dict[str, dict[str, Any]] = {
    **{k: {"finetuning_type": "freeze"} for k in ("freeze_trainable_layers", "freeze_trainable_modules")},
    "freeze_extra_modules": {"finetuning_type": "freeze"},
    **{k: {"stage": "dpo"} for k in ("pref_beta", "pref_loss", "pref_ftx")},
    **{k: {"quantization_bit": 4} for k in ("quantization_type", "double_quantization")},
    "buffer_size": {"streaming": True, "max_steps": 5},
    "template_file": {"template": "qa"},
    "preserve_thinking": {"mask_history": True},
    **{k: {"save_steps": 5} for k in ("save_total_limit", "save_only_model", "save_on_each_node")},
    "eval_steps": {"val_size": 0.1},
    "label_smoothing_factor": {"fast_loss": False},
    **{
        k: {"eval_strategy": "steps", "eval_steps": 5, "val_size": 0.1}
        for k in ("eval_delay", "eval_on_start")
    },
    **{
        k: {"push_to_hub": True}
        for k in ("hub_model_id", "hub_strategy", "hub_private_repo", "hub_revision", "hub_always_push")
    },
    "dataloader_persistent_workers": {"dataloader_num_workers": 1},
    "reward_funcs": {"stage": "grpo"},
    **{k: {"stage": "grpo", "reward_funcs": ["answer_match"]} for k in GRPO_KEYS if k != "reward_funcs"},
}

# context that other rules need (a valid combination), not refused as "no effect" without it
NEEDS: dict[str, dict[str, Any]] = {
    "dataloader_prefetch_factor": {"dataloader_num_workers": 1},
    "lr_scheduler_kwargs": {"lr_scheduler_type": "cosine"},
    "do_train": {"dataset": "some_data"},
    "interleave_probs": {"mix_strategy": "interleave_under"},
    "neftune_noise_alpha": {"fast_loss": False},
    "pissa_init": {"pissa_convert": True},
    **{k: {"finetuning_type": "full"} for k in ("use_apollo", "use_badam", "use_galore")},
}

# valid non-default values the generic rule below cannot guess
VALUES: dict[str, Any] = {
    "model_name_or_path": "other/model",
    "quantization_bit": 4,
    "output_dir": "/tmp/sftflow-sweep-other",
    "lora_target": ["q_proj", "v_proj"],
    "report_to": "none",
    "optim": "sgd",
    "lr_scheduler_type": "cosine",
    "lr_scheduler_kwargs": {"num_cycles": 0.5},
    "bf16": False,
    "fp16": False,
    "bf16_full_eval": False,
    "fp16_full_eval": False,
    "use_cpu": True,
    "ddp_backend": None,
    "fsdp": None,
    "fsdp_config": None,
    "deepspeed": None,
    "accelerator_config": {"split_batches": True},
    "debug": "underflow_overflow",
    "include_for_metrics": ["inputs"],
    "parallelism_config": None,
    "generation_config": None,
    "local_rank": -1,
    "log_level": "info",
    "log_level_replica": "error",
    "torch_compile_backend": "eager",
    "torch_compile_mode": "default",
    "dataloader_multiprocessing_context": "spawn",
    "dataloader_prefetch_factor": 2,
    "include_num_input_tokens_seen": "all",
    "trackio_static_space_id": None,
    "hub_strategy": "end",
    "metric_for_best_model": "loss",
    "load_best_model_at_end": False,
    "do_eval": False,
    "do_predict": False,
    "resume_from_checkpoint": None,
    "eval_strategy": "no",
    "adapter_name_or_path": "some/adapter",
    "new_special_tokens": ["<x>"],
    "stage": "pt",
    "finetuning_type": "full",
    "max_steps": 7,
    "attn_implementation": "eager",
    "interleave_probs": [0.25, 0.75],
    "logging_steps": 3,
    "save_steps": 7,
    "tf32": False,
    "quantization_method": "bnb",  # the only method that works (hqq is refused with the reason)
    "serve_batching": "dynamic",  # the one batched path (continuous was removed, issue #23)
    "reward_funcs": ["length_target"],
    "reward_weights": [0.5],
    "reward_kwargs": {"answer_column": "gold"},
    "num_generations": 2,  # the default batch (8) holds whole groups
}
# keys set to a value equal to HF's default but not sftflow's, or whose landing transformers rewrites
NOT_COMPARED = {
    "quantization_method",
    "serve_batching",
    "report_to",
    "include_num_input_tokens_seen",
    "ddp_backend",
    "fsdp",
    "fsdp_config",
    "deepspeed",
    "parallelism_config",
    "generation_config",
    "local_rank",
    "trackio_static_space_id",
    "load_best_model_at_end",
    "do_eval",
    "do_predict",
    "resume_from_checkpoint",
    "eval_strategy",
    "bf16",
    "fp16",
    "bf16_full_eval",
    "fp16_full_eval",
}


# keys sftflow does not use at all: refused whatever the value, with what to set instead
ALWAYS_REFUSED = {"generation_max_length"}


def _default(key: str) -> Any:
    from sftflow.config.parser import TRAINING_DEFAULTS

    cls, f, _ = FIELDS[key]
    if cls is all_classes()[-1] and key in TRAINING_DEFAULTS:
        return TRAINING_DEFAULTS[key]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def valid_value(key: str) -> Any:
    """A valid value other than the default."""
    if key in VALUES:
        return VALUES[key]
    tp, default = FIELDS[key][2], _default(key)
    if isinstance(default, enum.Enum):
        default = default.value
    words = _keyword_set(key)
    options = _options(tp)
    if words:
        return next(w for w in words if w != default)
    if bool in options:
        return not default
    if key in RANGES:
        allowed = RANGES[key]
        if int in options:
            value = (default if isinstance(default, int) else int(allowed.low or 0)) + 1
            return value if value in allowed else value - 2
        if allowed.high is not None:
            return (allowed.high + (allowed.low or 0)) / 2 if default != 0.5 else 0.25
        return (default or 0) + 0.5
    if any(typing.get_origin(o) is list for o in options):
        return ["q_proj"]
    if any(typing.get_origin(o) is dict or o is dict for o in options):
        return {"use_reentrant": False}
    return "some-value"


def _landed(args: Any, key: str) -> Any:
    for group in (args.model, args.data, args.finetuning, args.generating, args.training):
        if hasattr(group, key):
            value = getattr(group, key)
            return value.value if isinstance(value, enum.Enum) else value
    raise AssertionError(f"{key} is on no argument group")


@pytest.fixture(scope="module")
def defaults():
    return args_from_dict(BASE)


@pytest.mark.parametrize("key", KEYS)
def test_a_valid_value_reaches_its_argument_group(key, defaults):
    value = valid_value(key)
    if key in ALWAYS_REFUSED:
        with pytest.raises(SftflowError, match=f"{key} has no effect here: "):
            args_from_dict({**BASE, key: value})
        return
    args = args_from_dict({**BASE, **CONTEXT.get(key, {}), **NEEDS.get(key, {}), key: value})
    if key in NOT_COMPARED:
        return
    assert _landed(args, key) != _landed(defaults, key), f"{key}={value!r} changed nothing"


@pytest.mark.parametrize("key", sorted(CONTEXT))
def test_a_key_without_its_context_is_refused_as_having_no_effect(key):
    if key in (
        "eval_steps",
    ):  # eval_steps alone turns eval on (eval_strategy: steps): it needs held-out data
        with pytest.raises(SftflowError, match="held-out data"):
            args_from_dict({**BASE, key: valid_value(key)})
        return
    with pytest.raises(SftflowError, match=f"{key} has no effect here: "):
        args_from_dict({**BASE, key: valid_value(key)})


@pytest.mark.parametrize(
    ("key", "value", "context", "reason"),
    [
        ("lora_rank", 4, {"finetuning_type": "full"}, "applies to finetuning_type: lora only"),
        ("compare_base", False, {"finetuning_type": "freeze"}, "applies to finetuning_type: lora only"),
        ("mask_history", True, {"stage": "pt"}, "applies to stage: sft only"),
        (
            "tokenized_cache_dir",
            "/tmp/c",
            {"streaming": True, "max_steps": 5},
            "does not apply with streaming",
        ),
        ("save_total_limit", 2, {"save_strategy": "no"}, "applies only when checkpoints are saved"),
        ("eval_steps", 5, {"eval_strategy": "epoch", "val_size": 0.1}, "eval_strategy: steps only"),
        ("generation_max_length", 64, {}, "set max_new_tokens"),
        ("label_smoothing_factor", 0.1, {}, "needs fast_loss: false"),
        ("quantization_type", "fp4", {"quantization_bit": 8}, "applies to quantization_bit: 4 only"),
        ("predict_with_generate", True, {"stage": "rm"}, "applies to stage: sft only"),
        ("hub_model_id", "me/model", {}, "applies with push_to_hub: true only"),
    ],
)
def test_keys_that_change_nothing_here_are_refused(key, value, context, reason):
    with pytest.raises(SftflowError, match=f"{key} has no effect here: .*{reason}"):
        args_from_dict({**BASE, **context, key: value})


def test_lora_keys_reach_the_peft_config(tiny_model_dir, tiny_tokenizer):
    from sftflow.train.steps import build_model

    args = args_from_dict(
        {
            "model_name_or_path": str(tiny_model_dir),
            "output_dir": "/tmp/o",
            "lora_rank": 3,
            "lora_alpha": 5,
            "lora_dropout": 0.25,
            "lora_target": "q_proj,v_proj",
            "use_rslora": True,
            "use_dora": True,
            "additional_target": "norm",
        }
    )
    model = build_model(args, tiny_tokenizer)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (3, 5, 0.25)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.use_rslora and config.use_dora
    assert "norm" in config.modules_to_save


def test_generation_keys_reach_the_generation_config():
    args = args_from_dict(
        {
            **BASE,
            "do_sample": True,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 7,
            "num_beams": 2,
            "max_new_tokens": 33,
            "repetition_penalty": 1.2,
        }
    )
    from transformers import GenerationConfig

    config = GenerationConfig(**args.generating.to_generation_kwargs())
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.5, 0.9, 7)
    assert (config.num_beams, config.max_new_tokens, config.repetition_penalty) == (2, 33, 1.2)


def test_the_context_table_names_real_keys():
    assert set(CONTEXT) <= set(KEYS) and set(VALUES) <= set(KEYS)
    assert Path(__file__).name == "test_config_sweep.py"
