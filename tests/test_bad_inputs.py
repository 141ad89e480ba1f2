"""Bad input, as a whole: configs, CLI flags and data files a user gets wrong.

Each case runs the real CLI entry point (`sftflow.cli.main`, in this process to keep it fast) and checks:
a non-zero exit, one specific `sftflow error:` message (no traceback), and no output presented as a
finished run (no adapter, no results file, no "run finished" summary). Bad API requests are covered by
the inference server's own tests.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from helpers import train_config
from sftflow.cli import main

FINAL_OUTPUTS = ("adapter_model.safetensors", "all_results.json", "train_results.json", "model.safetensors")


def base_config(model_dir: Path, data_dir: Path, out: Path) -> dict:
    return train_config(
        model_dir,
        data_dir,
        out,
        eval_dataset="toy_heldout",
        lora_rank=4,
        max_steps=1,
        plot_loss=False,
        preview_rows=0,
        tokenized_cache_dir=str(out.parent / "cache"),
    )


def write_yaml(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def registry(data_dir: Path, entries: dict) -> None:
    (data_dir / "dataset_info.json").write_text(json.dumps(entries))


def with_data(rows: object, formatting: str = "alpaca", suffix: str = "json", **entry) -> Callable:
    """A case whose dataset `bad` holds `rows` (a list, written as JSON, or raw text)."""

    def prepare(tmp: Path, cfg: dict) -> list[str]:
        data_dir = Path(cfg["dataset_dir"])
        path = data_dir / f"bad.{suffix}"
        path.write_text(rows if isinstance(rows, str) else json.dumps(rows), encoding="utf-8")
        info = json.loads((data_dir / "dataset_info.json").read_text())
        info["bad"] = {"file_name": path.name, "formatting": formatting, **entry}
        registry(data_dir, info)
        return [write_yaml(tmp / "run.yaml", {**cfg, "dataset": "bad"})]

    return prepare


def overrides(*items: str) -> Callable:
    def prepare(tmp: Path, cfg: dict) -> list[str]:
        return [write_yaml(tmp / "run.yaml", cfg), *items]

    return prepare


def config_with(**values) -> Callable:
    def prepare(tmp: Path, cfg: dict) -> list[str]:
        cfg = {**cfg, **values}
        return [write_yaml(tmp / "run.yaml", {k: v for k, v in cfg.items() if v is not None})]

    return prepare


def raw_file(name: str, text: str) -> Callable:
    def prepare(tmp: Path, cfg: dict) -> list[str]:
        (tmp / name).write_text(text)
        return [str(tmp / name)]

    return prepare


def mutate_registry(change: Callable[[Path], None], **values) -> Callable:
    def prepare(tmp: Path, cfg: dict) -> list[str]:
        change(Path(cfg["dataset_dir"]))
        return [write_yaml(tmp / "run.yaml", {**cfg, **values})]

    return prepare


def earlier_run(tmp: Path, cfg: dict) -> list[str]:
    out = Path(cfg["output_dir"])
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("an earlier run")
    return [write_yaml(tmp / "run.yaml", cfg)]


GOOD_ROW = {"instruction": "What is 1 plus 1?", "input": "", "output": "2"}

# (id, how to build argv, the message it must print)
CASES: list[tuple[str, Callable, str]] = [
    # config files and CLI flags
    (
        "missing-config-file",
        lambda tmp, cfg: [str(tmp / "nope.yaml")],
        r"config file not found: .*nope\.yaml",
    ),
    ("yaml-syntax", raw_file("run.yaml", "learning_rate: [1e-4\n"), r"run\.yaml is not valid YAML"),
    ("json-syntax", raw_file("run.json", '{"learning_rate": }'), r"run\.json is not valid JSON"),
    (
        "yaml-not-a-mapping",
        raw_file("run.yaml", "- a\n- b\n"),
        r"must hold `key: value` pairs .* found a list",
    ),
    (
        "unknown-key",
        overrides("lerning_rate=1e-4"),
        r"unknown key 'lerning_rate'\. Did you mean 'learning_rate'\?",
    ),
    (
        "alias-and-its-target",
        overrides("warmup_ratio=0.1", "warmup_steps=2"),
        r"warmup_ratio and warmup_steps are both set",
    ),
    (
        "refused-llamafactory-key",
        overrides("infer_backend=vllm"),
        r"infer_backend: .*vLLM is not supported",
    ),
    ("tracker-not-installed", overrides("report_to=wandb"), r"report_to: wandb is not installed"),
    (
        "override-without-equals",
        overrides("learning_rate"),
        r"override 'learning_rate' is not of the form key=value",
    ),
    ("override-empty-key", overrides("=3"), r"override '=3' is not of the form key=value"),
    ("not-a-number", overrides("learning_rate=fast"), r"bad value for learning_rate: expected a number"),
    ("not-an-integer", overrides("lora_rank=2.5"), r"bad value for lora_rank: expected an integer"),
    ("not-a-bool", overrides("do_train=maybe"), r"bad value for do_train"),
    (
        "bad-choice",
        overrides("finetuning_type=lroa"),
        r"bad value for finetuning_type: .*did you mean 'lora'",
    ),
    ("lora-rank-zero", overrides("lora_rank=0"), r"lora_rank must be >= 1, got 0"),
    ("lora-dropout-range", overrides("lora_dropout=1.5"), r"lora_dropout must be in \[0, 1\), got 1\.5"),
    ("cutoff-too-small", overrides("cutoff_len=4"), r"cutoff_len must be at least 8, got 4"),
    ("val-size-negative", overrides("val_size=-0.1"), r"val_size must be a fraction in \[0, 1\)"),
    ("max-samples-zero", overrides("max_samples=0"), r"max_samples must be a positive number, got 0"),
    ("quantization-bits", overrides("quantization_bit=3"), r"quantization_bit must be 4, 8 or unset, got 3"),
    (
        "quantization-full",
        overrides("quantization_bit=4", "finetuning_type=full"),
        r"quantization_bit needs finetuning_type: lora",
    ),
    ("temperature-zero", overrides("temperature=0"), r"temperature must be > 0, got 0"),
    ("top-p-range", overrides("top_p=1.5"), r"top_p must be in \(0, 1\], got 1\.5"),
    ("no-model", config_with(model_name_or_path=None), r"model_name_or_path is required"),
    ("no-output-dir", config_with(output_dir=None), r"output_dir is required"),
    ("train-without-dataset", config_with(dataset=None), r"do_train is set but no dataset is given"),
    (
        "eval-without-heldout",
        config_with(eval_dataset=None, do_eval=True),
        r"do_eval/do_predict need held-out data",
    ),
    (
        "predict-without-generate",
        overrides("do_predict=true"),
        r"do_predict needs predict_with_generate: true",
    ),
    (
        "output-dir-holds-a-run",
        earlier_run,
        r"output_dir .* already holds files\. Set overwrite_output_dir: true",
    ),
    (
        "resume-nothing-saved",
        overrides("resume_from_checkpoint=true"),
        r"resume_from_checkpoint: no complete checkpoint in .*save_strategy: steps",
    ),
    (
        "resume-missing-path",
        overrides("resume_from_checkpoint=/no/such/checkpoint-5"),
        r"resume_from_checkpoint: /no/such/checkpoint-5 is not a directory",
    ),
    # data registry and files
    (
        "dataset-not-registered",
        config_with(dataset="toyy"),
        r"dataset 'toyy' is not in .*dataset_info\.json\. Did you mean 'toy'\?",
    ),
    (
        "registry-missing",
        mutate_registry(lambda d: (d / "dataset_info.json").unlink()),
        r"no dataset registry at .*dataset_info\.json",
    ),
    (
        "registry-not-json",
        mutate_registry(lambda d: (d / "dataset_info.json").write_text("{oops")),
        r"dataset_info\.json is not valid JSON",
    ),
    (
        "data-file-missing",
        mutate_registry(lambda d: (d / "train.json").unlink()),
        r"train\.json does not exist",
    ),
    ("data-file-not-json", with_data("[{'instruction': 1,"), r"bad\.json is not valid JSON"),
    (
        "empty-answer",
        with_data([GOOD_ROW, {**GOOD_ROW, "output": ""}]),
        r"bad\.json: 1 of 2 rows are malformed.*row 1",
    ),
    (
        "missing-column",
        with_data([GOOD_ROW, {"input": "", "output": "2"}]),
        r"bad\.json: 1 of 2 rows are malformed.*row 1",
    ),
    (
        "sharegpt-bad-role",
        with_data(
            [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "hello"}]}],
            formatting="sharegpt",
            columns={"messages": "conversations"},
        ),
        r"bad\.json.*row 0.*robot",
    ),
    ("nothing-fits-cutoff", config_with(cutoff_len=8), r"no example fits cutoff_len=8; raise cutoff_len"),
    # model
    (
        "model-dir-missing",
        config_with(model_name_or_path="/no/such/model"),
        r"model path not found: /no/such/model",
    ),
    ("lora-target-not-found", overrides("lora_target=q_proj,qkv"), r"lora_target \['qkv'\] not found"),
]


@pytest.fixture(autouse=True)
def restore_logging():
    """`main` (and libraries it imports first here) set up log handlers on this test's captured stderr,
    which capsys closes afterwards: point them back at the live stderr so later tests can log."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level
    loggers = [
        logging.root,
        *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # (setStream would flush the closed one)


@pytest.mark.parametrize(("prepare", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(prepare, expected, tmp_path, tiny_model_dir, toy_data_dir, capsys):
    cfg = base_config(tiny_model_dir, toy_data_dir, tmp_path / "out")
    argv = prepare(tmp_path, cfg)
    code = main(["train", *argv])
    captured = capsys.readouterr()
    assert code != 0, f"exit code 0 for a bad input; stdout: {captured.out[-500:]}"
    errors = [line for line in captured.err.splitlines() if line.startswith("sftflow error: ")]
    assert len(errors) == 1, captured.err[-2000:]
    message = captured.err[captured.err.index("sftflow error: ") :]
    assert re.search(expected, message, re.S), message
    assert "Traceback" not in captured.err
    assert "run finished" not in captured.out
    out = Path(cfg["output_dir"])
    if prepare is not earlier_run:
        assert not any((out / name).exists() for name in FINAL_OUTPUTS)


def test_unknown_command_exits_non_zero(capsys):
    assert main(["trian", "run.yaml"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
