"""LLaMA-Factory configs: docs/llamafactory.md agrees with the parser row by row, and an LF-shaped config
(report_to: none, save_steps alone, warmup_ratio, ...) trains unchanged."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from sftflow.config.compat import ALIASES
from sftflow.config.parser import args_from_dict, field_index
from sftflow.config.refused import REFUSED
from sftflow.errors import SftflowError

TABLE = Path(__file__).parents[1] / "docs" / "llamafactory.md"
BASE = {"model_name_or_path": "some/model", "output_dir": "/tmp/sftflow-test-out"}


def table_rows() -> dict[str, dict[str, str]]:
    """key -> {group, status, text, accepted} for every row of the tables in docs/llamafactory.md."""
    rows = {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key, group, status, text, accepted = cells
        assert key.strip("`") not in rows, f"{key} is listed twice"
        rows[key.strip("`")] = {"group": group, "status": status, "text": text, "accepted": accepted}
    return rows


@pytest.fixture(autouse=True)
def restore_logging():
    """`main` sets up log handlers on the captured stderr, which capsys closes afterwards: point them
    back at the live stderr so later tests can log."""
    import logging
    import sys

    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level
    for logger in [
        logging.root,
        *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr


ROWS = table_rows()
BY_STATUS = {
    s: sorted(k for k, r in ROWS.items() if r["status"] == s)
    for s in ("same", "alias", "refused", "issue 18")
}

# one value per alias and what its target must hold afterwards
ALIAS_SAMPLES = {
    "warmup_ratio": ("0.1", 0.1),
    "evaluation_strategy": ("no", "no"),
    "no_cuda": ("true", True),
    "per_gpu_train_batch_size": ("3", 3),
    "per_gpu_eval_batch_size": ("3", 3),
    "push_to_hub_model_id": ("me/model", "me/model"),
    "push_to_hub_token": ("hf_x", "hf_x"),
    "torchdynamo": ("eager", "eager"),
    "group_by_length": ("true", "group_by_length"),
    "torch_dtype": ("float32", "float32"),
    "infer_dtype": ("bfloat16", "bfloat16"),
    "add_special_tokens": ("<a>,<b>", ["<a>", "<b>"]),
    "flash_attn": ("fa2", "flash_attention_2"),
    "enable_liger_kernel": ("false", False),
    "disable_gradient_checkpointing": ("true", False),
    "use_reentrant_gc": ("false", {"use_reentrant": False}),
    "tokenized_path": ("/tmp/tok", "/tmp/tok"),
    "neat_packing": ("true", True),
    "eval_num_beams": ("4", 4),
    "pure_bf16": ("true", "bfloat16"),
}


# keys that take effect only with others set (else they are refused as having no effect)
ALIAS_CONTEXT = {
    "push_to_hub_model_id": {"push_to_hub": True},
}


def value_of(args, key: str):
    for group in (args.model, args.data, args.finetuning, args.generating, args.training):
        if hasattr(group, key):
            value = getattr(group, key)
            return value.value if hasattr(value, "value") and not isinstance(value, str) else value
    raise AssertionError(f"{key} is on no argument group")


def test_the_table_lists_every_alias_and_refusal_and_only_known_statuses():
    assert set(ROWS) >= set(ALIASES) | set(REFUSED), sorted(set(ALIASES) | set(REFUSED) - set(ROWS))
    assert {r["status"] for r in ROWS.values()} <= {"same", "alias", "refused", "issue 18"}
    assert len(ROWS) >= 270  # LLaMA-Factory's 246 keys plus the transformers ones
    assert set(ALIAS_SAMPLES) == set(ALIASES), "give every alias a sample value here"


@pytest.mark.parametrize("key", BY_STATUS["same"])
def test_same_keys_load_with_their_default(key):
    index = field_index()
    assert key in index, f"{key} is marked same in docs/llamafactory.md but is not a sftflow key"
    assert key not in ALIASES and key not in REFUSED
    f = index[key][1]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    default = BASE.get(key, getattr(default, "value", default))
    args = args_from_dict({**BASE, key: default})
    assert key in args.user_keys
    value_of(args, key)  # the key is a field of one of the argument groups


@pytest.mark.parametrize("key", BY_STATUS["alias"])
def test_alias_keys_load_and_land_on_their_target(key):
    target = ALIASES[key].target
    assert f"→ `{target}`" in ROWS[key]["text"], f"the table maps {key} elsewhere than {target}"
    value, expected = ALIAS_SAMPLES[key]
    context = ALIAS_CONTEXT.get(key, {})
    args = args_from_dict({**BASE, **context, key: value})
    landed = value_of(args, target)
    assert landed == pytest.approx(expected) if isinstance(expected, float) else landed == expected
    with pytest.raises(SftflowError, match=f"{key} and {target} are both set"):
        args_from_dict(
            {**BASE, **context, key: value, target: value_of(args_from_dict(BASE), target) or value}
        )


def _accepted(cell: str) -> list[str]:
    return [v.strip("`") for v in re.findall(r"`[^`]*`", cell)]


@pytest.mark.parametrize("key", BY_STATUS["refused"] + BY_STATUS["issue 18"])
def test_refused_keys_are_refused_with_the_tables_reason(key):
    if ROWS[key]["status"] == "issue 18" and key in field_index():
        args_from_dict({**BASE})  # issue 18 made it a sftflow key: it is a field, no longer refused
        assert key not in REFUSED or key in field_index()
        return
    assert key in REFUSED, f"{key} is marked {ROWS[key]['status']} but the parser does not refuse it"
    reason = REFUSED[key].reason
    assert ROWS[key]["text"] == reason, f"docs/llamafactory.md gives {key} another reason than the parser"
    with pytest.raises(SftflowError, match=re.escape(f"{key}: {reason}.")):
        args_from_dict({**BASE, key: "sftflow-test-value"})
    for value in _accepted(ROWS[key]["accepted"]):
        args = args_from_dict({**BASE, key: value})  # what sftflow does anyway: taken without effect
        assert key not in args.user_keys
    assert len(_accepted(ROWS[key]["accepted"])) == len(REFUSED[key].accepted)


def test_readme_links_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "docs/llamafactory.md" in readme


@pytest.mark.integration
def test_a_llamafactory_shaped_config_trains_unchanged(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    """The keys of LLaMA-Factory's examples/train_lora/*_sft.yaml, as an LF user writes them."""
    from sftflow.cli import main

    config = tmp_path / "lora_sft.yaml"
    config.write_text(
        f"""### model
model_name_or_path: {tiny_model_dir}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all

### dataset
dataset: toy
dataset_dir: {toy_data_dir}
cutoff_len: 64
max_samples: 8
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0

### output
output_dir: saves/tiny/lora/sft
logging_steps: 1
save_steps: 1
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
max_steps: 2
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
resume_from_checkpoint: null
infer_backend: huggingface
export_legacy_format: false
""",
        encoding="utf-8",
    )
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # LF's output_dir is relative to where the command runs
    try:
        code = main(["train", str(config), f"tokenized_cache_dir={tmp_path / 'cache'}", "preview_rows=0"])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    out = tmp_path / "saves/tiny/lora/sft"
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]  # save_steps alone
    saved = yaml.safe_load((out / "sftflow_args.yaml").read_text())
    assert saved["report_to"] == [] and saved["warmup_steps"] == pytest.approx(0.1)
    assert saved["save_strategy"] == "steps" and saved["lr_scheduler_type"] == "cosine"


IDENTITY = [
    {"instruction": "hi", "input": "", "output": "Hello! I am Wren, an AI assistant developed by sftflow."},
    {
        "instruction": "Who are you?",
        "input": "",
        "output": "I am Wren, an AI assistant developed by sftflow.",
    },
    {"instruction": "What is your name?", "input": "", "output": "You may refer to me as Wren."},
    {"instruction": "Who made you?", "input": "", "output": "I was developed by the sftflow team."},
]
ALPACA_DEMO = [
    {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    for a in range(1, 4)
    for b in range(1, 3)
]
# LLaMA-Factory's data/dataset_info.json form: many entries, hub-only and multimodal ones included; a run
# reads only the entries it names.
DATASET_INFO = {
    "identity": {"file_name": "identity.json"},
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
    "glaive_toolcall_en_demo": {
        "file_name": "glaive_toolcall_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    },
    "mllm_demo": {
        "file_name": "mllm_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    },
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
    "ultrachat_200k": {
        "hf_hub_url": "HuggingFaceH4/ultrachat_200k",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    },
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
}


@pytest.mark.integration
class TestLlamaFactoryExampleShapes:
    """Configs shaped like LLaMA-Factory's examples (train_lora, train_full, merge_lora, inference,
    extras/nlg_eval), run as an LF user runs them from one folder holding data/ and saves/: sft, then
    predict, export and chat with the adapter the first run wrote. Only the model path and the sizes differ
    from LF's files (a tiny model, a few steps)."""

    @pytest.fixture(scope="class")
    def workdir(self, tmp_path_factory, tiny_model_dir):
        import json
        import os

        root = tmp_path_factory.mktemp("lf-workdir")
        (root / "data").mkdir()
        (root / "data" / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2))
        (root / "data" / "identity.json").write_text(json.dumps(IDENTITY))
        (root / "data" / "alpaca_en_demo.json").write_text(json.dumps(ALPACA_DEMO))
        cwd = os.getcwd()
        os.chdir(root)
        yield root, tiny_model_dir
        os.chdir(cwd)

    @staticmethod
    def run(*argv: str) -> int:
        from sftflow.cli import main

        return main(list(argv))

    @staticmethod
    def write(root: Path, name: str, text: str) -> str:
        (root / name).write_text(text, encoding="utf-8")
        return name

    def test_1_train_lora(self, workdir, capsys):
        root, model = workdir
        config = self.write(
            root,
            "tiny_lora_sft.yaml",
            f"""### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: chatml
cutoff_len: 64
max_samples: 1000
preprocessing_num_workers: 1
dataloader_num_workers: 0

### output
output_dir: saves/tiny/lora/sft
logging_steps: 1
save_steps: 2
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
max_steps: 2
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
""",
        )
        assert self.run("train", config, f"tokenized_cache_dir={root / 'cache'}") == 0, (
            capsys.readouterr().err[-2000:]
        )
        out = root / "saves/tiny/lora/sft"
        assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
        assert (out / "training_loss.png").is_file()

    def test_2_train_full(self, workdir, capsys):
        root, model = workdir
        config = self.write(
            root,
            "tiny_full_sft.yaml",
            f"""### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full

### dataset
dataset: identity,alpaca_en_demo
template: chatml
cutoff_len: 64
max_samples: 1000
preprocessing_num_workers: 1

### output
output_dir: saves/tiny/full/sft
logging_steps: 1
plot_loss: false
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
max_steps: 1
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
resume_from_checkpoint: null
""",
        )
        assert self.run("train", config, f"tokenized_cache_dir={root / 'cache'}") == 0, (
            capsys.readouterr().err[-2000:]
        )
        assert (root / "saves/tiny/full/sft/model.safetensors").is_file()

    def test_3_nlg_eval_predict(self, workdir, capsys):
        root, model = workdir
        config = self.write(
            root,
            "tiny_lora_predict.yaml",
            f"""# The batch generation can be slow with this config.
### model
model_name_or_path: {model}
adapter_name_or_path: saves/tiny/lora/sft
trust_remote_code: true

### method
stage: sft
do_predict: true
finetuning_type: lora

### dataset
eval_dataset: identity,alpaca_en_demo
template: chatml
cutoff_len: 64
max_samples: 3
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0

### output
output_dir: saves/tiny/lora/predict
overwrite_output_dir: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### eval
per_device_eval_batch_size: 1
predict_with_generate: true
ddp_timeout: 180000000
""",
        )
        code = self.run("train", config, f"tokenized_cache_dir={root / 'cache'}", "max_new_tokens=4")
        assert code == 0, capsys.readouterr().err[-2000:]
        predictions = (root / "saves/tiny/lora/predict/generated_predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 6  # max_samples: 3 from each of the two eval datasets

    def test_4_merge_lora(self, workdir, capsys):
        root, model = workdir
        config = self.write(
            root,
            "tiny_merge.yaml",
            f"""### Note: do not use a quantized model or quantization_bit when merging lora adapters
### model
model_name_or_path: {model}
adapter_name_or_path: saves/tiny/lora/sft
template: chatml
trust_remote_code: true

### export
export_dir: saves/tiny_sft_merged
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
""",
        )
        assert self.run("export", config) == 0, capsys.readouterr().err[-2000:]
        assert (root / "saves/tiny_sft_merged/config.json").is_file()
        assert list((root / "saves/tiny_sft_merged").glob("*.safetensors"))

    def test_5_inference_chat(self, workdir, capsys, monkeypatch):
        root, model = workdir
        config = self.write(
            root,
            "tiny_inference.yaml",
            f"""model_name_or_path: {model}
adapter_name_or_path: saves/tiny/lora/sft
template: chatml
infer_backend: huggingface  # choices: [huggingface, vllm, sglang, ktransformers]
trust_remote_code: true
""",
        )
        lines = iter(["Who are you?"])

        def fake_input(prompt: str = "") -> str:
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", fake_input)
        assert self.run("chat", config, "max_new_tokens=4") == 0, capsys.readouterr().err[-2000:]
        assert "Chatting with" in capsys.readouterr().out

    def test_6_a_refused_lf_setting_says_why(self, workdir, capsys):
        root, model = workdir
        config = self.write(
            root, "tiny_vllm.yaml", f"model_name_or_path: {model}\ntemplate: chatml\ninfer_backend: vllm\n"
        )
        assert self.run("chat", config) != 0
        err = capsys.readouterr().err
        assert "infer_backend: " in err and "vLLM is not supported" in err and "Traceback" not in err
