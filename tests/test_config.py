"""Config parsing: typed overrides, refusal of unknown keys and bad values, help from field docs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from sftflow.cli import COMMANDS
from sftflow.config import help_text, load_args
from sftflow.config.coerce import coerce
from sftflow.config.parser import all_classes, args_from_dict, field_docs
from sftflow.config.run_dir import infer_args
from sftflow.errors import SftflowError
from sftflow.stages.registry import STAGES

BASE = ["model_name_or_path=some/model", "output_dir=/tmp/sftflow-test-out"]


def test_no_two_argument_classes_share_a_field_name():
    seen: dict[str, str] = {}
    for cls in all_classes():
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                assert f.name not in seen, f"{f.name} is in both {seen[f.name]} and {cls.__name__}"
                seen[f.name] = cls.__name__


def test_yaml_file_and_overrides_are_typed_by_field(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model_name_or_path: m\noutput_dir: o\nlearning_rate: 1e-4\nlora_target: q_proj\ndo_train: true\ndataset: a\n"
    )
    args = load_args(
        config,
        ["lora_target=q_proj, v_proj", "num_train_epochs=2", "max_samples=null", "dataset=a,b", "bf16=false"],
    )
    assert args.training.learning_rate == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; we type it
    assert args.finetuning.lora_target == ["q_proj", "v_proj"]
    assert args.training.num_train_epochs == 2.0 and args.data.max_samples is None
    assert args.data.dataset == ["a", "b"] and args.training.bf16 is False
    assert args.finetuning.lora_alpha == 16  # derived default: 2 * rank


def test_json_config_is_read(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"model_name_or_path": "m", "output_dir": "o", "cutoff_len": 64}')
    assert load_args(config).data.cutoff_len == 64


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lerning_rate=1e-4", "Did you mean 'learning_rate'"),
        ("lora_rnak=8", "Did you mean 'lora_rank'"),
        ("warmup_ratio=1.0", "warmup_ratio must be in \\[0, 1\\)"),
        ("warmup_ratio=0.1", None),  # (with warmup_steps below: both set)
        ("finetuning_type=lorra", "did you mean 'lora'"),
        ("cutoff_len=abc", "bad value for cutoff_len: expected an integer"),
        ("do_train=maybe", "bad value for do_train: expected true or false"),
        ("quantization_bit=3", "quantization_bit must be 4, 8"),
        ("val_size=-1", "val_size must be"),
        ("lr_scheduler_type=cosinee", "bad value for lr_scheduler_type: .*did you mean 'cosine'"),
        ("save_strategy=sometimes", "bad value for save_strategy: expected one of no, steps, epoch, best"),
        ("report_to=wandb", "report_to: wandb is not installed"),
        ("optim=lomo", "optim: lomo cannot be used here: .*lomo"),
        ("optim=galore_adamw", "optim: galore_adamw cannot be used here: .*optim_target_modules"),
        (
            'lr_scheduler_kwargs={"min_lr":0.1}',
            "lr_scheduler_kwargs: min_lr not taken by lr_scheduler_type: linear",
        ),
        ("log_level=loud", "bad value for log_level: expected one of detail, debug"),
        ("seed=-1", r"seed must be in \[0, 4294967295\], got -1"),
        ("adam_beta1=1", r"adam_beta1 must be in \[0, 1\), got 1"),
        ("report_to=tensorbord", "report_to: 'tensorbord' is not a tracker"),
        ("nonsense", "is not of the form key=value"),
        ("per_device_train_batch_size=0", "per_device_train_batch_size must be >= 1"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps must be >= 1"),
        ("learning_rate=-1", "learning_rate must be >= 0"),
        ("max_steps=0", r"max_steps must be >= -1 and not 0 \(a positive number of steps"),
        ("num_train_epochs=0", "num_train_epochs must be > 0"),
        ("logging_steps=0", r"invalid training arguments \(logging_steps\): .*non-zero --logging_steps"),
    ],
)
def test_bad_keys_and_values_are_refused_with_a_clear_message(override, message):
    if message is None:
        override, message = f"{override} warmup_steps=3", "warmup_ratio and warmup_steps are both set"
    with pytest.raises(SftflowError, match=message):
        load_args(None, [*BASE, *override.split()])


def test_required_keys_and_cross_checks():
    with pytest.raises(SftflowError, match="model_name_or_path is required"):
        load_args(None, ["output_dir=o"])
    with pytest.raises(SftflowError, match="no dataset"):
        load_args(None, [*BASE, "do_train=true"])
    with pytest.raises(SftflowError, match="held-out data"):
        load_args(None, [*BASE, "do_eval=true"])
    with pytest.raises(SftflowError, match="predict_with_generate"):
        load_args(None, [*BASE, "do_predict=true", "val_size=0.1"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(SftflowError, match="config file not found"):
        load_args(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(SftflowError, match="not valid YAML"):
        load_args(bad)
    with pytest.raises(SftflowError, match="is a directory"):
        load_args(tmp_path)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SftflowError, match="key: value"):
        load_args(listy)


def test_coerce_handles_unions_and_lists():
    assert coerce(int | None, "none") is None and coerce(str | None, "null") is None
    assert coerce(str | None, "none") == "none"  # a keyword where a string is allowed
    assert coerce(str | bool, "true") is True
    assert coerce(list[str], ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError):
        coerce(int, True)


def test_help_lists_every_key_with_its_doc():
    text = help_text()
    for cls in all_classes():
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                assert f"  {f.name} (" in text
    assert "Module names to adapt" in text  # from the lora_target field docstring
    assert "warmup_ratio -> warmup_steps" in text and "docs/llamafactory.md" in text
    from sftflow.config import FinetuningArguments

    assert field_docs(FinetuningArguments)["lora_rank"] == "LoRA rank r."


def test_sftflow_training_defaults_apply_unless_set():
    args = load_args(None, BASE)
    assert args.training.include_num_input_tokens_seen == "non_padding"
    assert args.training.logging_steps == 5
    args = load_args(None, [*BASE, "logging_steps=1"])
    assert args.training.logging_steps == 1


def test_keyword_strings_stay_strings_in_yaml_and_on_the_command_line(tmp_path):
    """LLaMA-Factory writes `report_to: none` and `save_strategy: "no"`; HF means the words, not None/False."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "model_name_or_path: m\noutput_dir: o\nreport_to: none  # choices: [none, wandb]\n"
        "save_strategy: no\nlr_scheduler_type: cosine\nresume_from_checkpoint: null\neval_strategy: 'no'\n"
    )
    args = load_args(config)
    assert args.training.report_to == []  # what HF makes of the string "none"
    assert args.training.save_strategy == "no" and args.training.eval_strategy == "no"
    assert args.training.lr_scheduler_type == "cosine" and args.training.resume_from_checkpoint is None
    args = load_args(
        None, [*BASE, "report_to=none", "save_strategy=no", "push_to_hub=true", "hub_strategy=end"]
    )
    assert args.training.report_to == [] and args.training.save_strategy == "no"
    assert args.training.hub_strategy == "end"
    args = load_args(None, [*BASE, "report_to=all", "include_num_input_tokens_seen=true", "tf32=null"])
    assert (
        args.training.include_num_input_tokens_seen == "all" and args.training.tf32 is None
    )  # HF: true = all


def test_warmup_ratio_becomes_warmup_steps():
    assert load_args(None, [*BASE, "warmup_ratio=0.1"]).training.warmup_steps == pytest.approx(0.1)
    assert load_args(None, [*BASE, "warmup_ratio=0"]).training.warmup_steps == 0
    assert "warmup_ratio" not in load_args(None, [*BASE, "warmup_ratio=0.1"]).to_yaml_dict()


def test_save_steps_alone_checkpoints_and_eval_steps_alone_evaluates():
    args = load_args(None, [*BASE, "save_steps=50"])
    assert args.training.save_strategy == "steps" and args.training.save_steps == 50
    assert load_args(None, BASE).training.save_strategy == "no"  # sftflow's default without save_steps
    args = load_args(None, [*BASE, "save_steps=50", "save_strategy=epoch"])
    assert args.training.save_strategy == "epoch"  # an explicit strategy wins
    args = load_args(None, [*BASE, "eval_steps=10", "val_size=0.1"])
    assert args.training.eval_strategy == "steps" and args.training.do_eval
    with pytest.raises(SftflowError, match="held-out data"):
        load_args(None, [*BASE, "eval_steps=10"])


@pytest.mark.integration
def test_train_start_up_prints_no_bitsandbytes_kernels_line(tmp_path, tiny_model_dir, toy_data_dir):
    """With bitsandbytes installed its CPU backend warns at import that `kernels` is missing; a fresh
    `sftflow train` (a new interpreter, so bitsandbytes is imported anew) prints no such line."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (the quant extra)")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_dir: {toy_data_dir}\ndataset: toy\ncutoff_len: 64\n"
        f"output_dir: {tmp_path / 'out'}\ndo_train: true\nmax_steps: 1\nlora_rank: 4\nplot_loss: false\n"
        f"preview_rows: 0\ntokenized_cache_dir: {tmp_path / 'cache'}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "sftflow.cli", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run finished" in done.stdout
    assert "gemm_4bit_forward" not in done.stderr + done.stdout
    assert "kernels-community" not in done.stderr + done.stdout


def test_a_full_runs_dir_serves_although_it_recorded_lora_keys(tmp_path):
    """A full fine-tune's sftflow_args.yaml records every resolved value (lora_alpha among them); reading it
    back for chat/api/predict must not refuse them, while a key the user sets still gets checked."""
    run = tmp_path / "run"
    run.mkdir()
    args = args_from_dict(
        {"model_name_or_path": "m", "dataset": "d", "output_dir": str(run), "finetuning_type": "full"}
    )
    (run / "sftflow_args.yaml").write_text(yaml.safe_dump(args.to_yaml_dict()))
    (run / "config.json").write_text("{}")
    served = infer_args(str(run), [])
    assert served.model.model_name_or_path == str(run) and served.finetuning.finetuning_type == "full"
    with pytest.raises(SftflowError, match="lora_dropout has no effect here"):
        infer_args(str(run), ["lora_dropout=0.3"])


def test_the_cli_help_names_every_stage():
    listed = COMMANDS["train"][1].split("stage: ")[1].split(")")[0].split("|")
    assert set(STAGES) <= set(listed), set(STAGES) - set(listed)
