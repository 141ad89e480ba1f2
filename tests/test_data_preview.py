"""`sftflow preview` / `sftflow preprocess` and the pure functions behind them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TOY_ROWS, as_overrides, train_config
from sftflow.data.audit import histogram, percentiles, summarize
from sftflow.data.inspect import render_marked, trained_spans

ROOT = Path(__file__).resolve().parent.parent


def test_trained_spans_marked_with_brackets_or_colour(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hi there<|im_end|>", add_special_tokens=False)
    n = len(tiny_tokenizer.encode("Hi", add_special_tokens=False))
    labels = [-100] * n + ids[n:]
    assert trained_spans(ids, labels) == [(False, ids[:n]), (True, ids[n:])]
    assert render_marked(tiny_tokenizer, ids, labels, color=False) == "Hi[[ there<|im_end|>]]"
    assert render_marked(tiny_tokenizer, ids, labels, color=True) == "Hi\x1b[32m there<|im_end|>\x1b[0m"


def test_statistics_from_the_per_example_facts():
    assert percentiles([2, 4, 6, 8]) == {"min": 2, "p50": 4, "p90": 8, "p95": 8, "p99": 8, "max": 8}
    assert histogram([2, 4, 6, 8], bins=2) == {"edges": [2, 6, 10], "counts": [2, 2]}
    facts = {
        "length": [2, 4, 6, 8],
        "n_trained": [1, 1, 1, 1],
        "eot_trained": [True, True, False, True],
        "empty": [False, True, False, False],
        "full_length": [2, 4, 6, 8, 99],  # one more example, dropped at cutoff_len
        "key": ["a", "b", "a", "c", "d"],
        "prompt_key": ["p", "q", "p", "q", "r"],
        "answer_key": ["x", "y", "x", "z", "w"],
    }
    stats = summarize(facts, truncated=1, dropped=1)
    assert stats["examples"] == 4 and stats["tokens"] == 20 and stats["trained_share"] == 4 / 20
    assert stats["full_length"]["max"] == 99 and stats["length"]["max"] == 8
    assert (stats["duplicates"], stats["conflicting"]) == (1, 1)  # "a" twice; prompt q answered y and z
    assert (stats["eot_untrained"], stats["empty_responses"]) == (1, 1)
    assert (stats["truncated"], stats["dropped"]) == (1, 1)


def _config(tmp_path, model_dir, data_dir, **overrides) -> list[str]:
    values = {"tokenized_cache_dir": str(tmp_path / "cache"), **overrides}
    return as_overrides(train_config(model_dir, data_dir, tmp_path / "out", **values))


def test_preview_and_preprocess_commands(tmp_path, tiny_model_dir, tiny_tokenizer, toy_data_dir, capsys):
    from sftflow.cli import main
    from sftflow.data.converters import alpaca_to_messages
    from sftflow.data.encode import encode_sft
    from sftflow.data.registry import ALPACA_COLUMNS

    assert main(["preview", *_config(tmp_path, tiny_model_dir, toy_data_dir), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example") == 2 and "[[" in out and "\x1b[" not in out
    assert "toy: 18 rows read, 0 skipped as malformed, 18 used" in out
    assert "train: 18 examples, 0 truncated, 0 dropped" in out and "trained tokens" in out

    path = tmp_path / "tok.jsonl"
    assert main(["preprocess", *_config(tmp_path, tiny_model_dir, toy_data_dir), "--output", str(path)]) == 0
    written = [json.loads(line) for line in path.read_text().splitlines()]
    expected = []
    for row in TOY_ROWS:
        enc = encode_sft(tiny_tokenizer, alpaca_to_messages(row, ALPACA_COLUMNS), 64)
        expected.append({"input_ids": enc.input_ids, "labels": enc.labels})
    assert written == expected  # dataset order

    # a config that does not train still preprocesses its training data
    config = _config(tmp_path, tiny_model_dir, toy_data_dir, do_train=None)
    assert main(["preprocess", *config, "--output", str(path)]) == 0
    assert [json.loads(line) for line in path.read_text().splitlines()] == expected


def test_a_command_without_its_required_argument_exits_2_with_its_usage(capsys):
    from sftflow.cli import main

    for argv in (["train"], ["preview"], ["plan"], ["report"], ["export"], ["predict"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        assert f"usage: sftflow {argv[0]}" in capsys.readouterr().err


def _example(name: str, tmp_path, model_dir) -> list[str]:
    """An example config of examples/ on the tiny model (its data folder read from the repository)."""
    return [
        str(ROOT / "examples" / name),
        f"model_name_or_path={model_dir}",
        f"dataset_dir={ROOT / 'data'}",
        f"output_dir={tmp_path / 'out'}",
        f"tokenized_cache_dir={tmp_path / 'cache'}",
    ]


def test_preview_preprocess_and_plan_show_pt_rows(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    from sftflow.cli import main

    config = _example("pt_demo.yaml", tmp_path, tiny_model_dir)
    assert main(["preview", *config, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- example 0: 128 tokens, 128 trained ---" in out  # full rows, every token trained
    assert "wren_text:" in out and "rows (from" in out and "trained tokens 100.0%" in out
    path = tmp_path / "rows.jsonl"
    assert main(["preprocess", *config, "--output", str(path)]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all(r["labels"] == r["input_ids"] for r in rows) and len(rows[0]["input_ids"]) == 128
    assert tiny_tokenizer.eos_token_id in rows[0]["input_ids"]  # texts end with eos


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_preview_preprocess_and_plan_show_pairs(stage, tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    from sftflow.cli import main

    config = _example(f"{stage}_demo.yaml", tmp_path, tiny_model_dir)
    assert main(["preview", *config, "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- pair 0: prompt" in out and "--- chosen:" in out and "--- rejected:" in out
    assert out.count("[[") >= 2 and "<|im_end|>]]" in out  # each answer trained through its end of turn
    assert "wren_pairs:" in out and "pairs" in out
    path = tmp_path / "pairs.jsonl"
    assert main(["preprocess", *config, "--output", str(path)]) == 0
    pair = json.loads(path.read_text().splitlines()[0])
    cut = pair["prompt_len"]
    assert pair["chosen_ids"][:cut] == pair["rejected_ids"][:cut]  # one shared prompt
    assert tiny_tokenizer.decode(pair["chosen_ids"][cut : pair["chosen_end"]]).endswith("<|im_end|>")


# what each stage's plan must show: pt rows of cutoff_len, rm's score head without LM logits, dpo's
# reference forward (LoRA: the base with the adapter disabled, no second copy of the weights)
STAGE_LINES = {
    "pt": ["texts -> ", "rows of at most 128 tokens", "trained share        100% (every token)"],
    "rm": ["score head", "logits               none", "8 pairs = 16 x "],
    "dpo": ["reference forward (the base, adapter disabled)", "logits in backward", "8 pairs = 16 x "],
}


@pytest.mark.parametrize("stage", ["pt", "rm", "dpo"])
def test_plan_runs_for_every_stage(stage, tmp_path, tiny_model_dir, capsys):
    from sftflow.cli import main
    from sftflow.config import load_args
    from sftflow.tools.plan import build_plan
    from sftflow.train.perf import flops_per_token, forward_flops_per_token

    config = _example(f"{stage}_demo.yaml", tmp_path, tiny_model_dir)
    assert main(["plan", *config]) == 0
    out = capsys.readouterr().out
    assert "Memory" in out and f"stage {stage}" in out
    for line in STAGE_LINES[stage]:
        assert line in out, line
    plan = build_plan(load_args(config[0], config[1:], require_output_dir=False))
    if stage == "pt":  # every row is cutoff_len tokens but the last of a batch of texts
        assert plan.largest_seq == 128 and plan.audit.tokens == sum(plan.rows)
    else:  # both sequences of every pair are computed
        assert plan.computed_tokens_per_epoch >= plan.audit.tokens > sum(plan.rows)
        assert plan.memory.logits_extra == (
            0 if stage == "rm" else 2 * 16 * plan.largest_seq * plan.shape.vocab * 4
        )
        assert plan.memory.reference == 0  # lora: the reference shares the base weights
        policy = flops_per_token(plan.shape, plan.setup, 10, gradient_checkpointing=False)
        reference = forward_flops_per_token(plan.shape, 10) if stage == "dpo" else 0
        assert plan.flops_per_token(10) == policy + reference
