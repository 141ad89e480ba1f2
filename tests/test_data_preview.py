"""`sftflow preview` / `sftflow preprocess` and the pure functions behind them."""

from __future__ import annotations

import json

from sftflow.data.inspect import length_stats, percentile, render_marked, trained_spans


def test_trained_spans_marked_with_brackets_or_colour(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hi there<|im_end|>", add_special_tokens=False)
    n = len(tiny_tokenizer.encode("Hi", add_special_tokens=False))
    labels = [-100] * n + ids[n:]
    assert trained_spans(ids, labels) == [(False, ids[:n]), (True, ids[n:])]
    assert render_marked(tiny_tokenizer, ids, labels, color=False) == "Hi[[ there<|im_end|>]]"
    assert render_marked(tiny_tokenizer, ids, labels, color=True) == "Hi\x1b[32m there<|im_end|>\x1b[0m"


def test_length_stats_and_percentiles():
    rows = [{"input_ids": [1] * n, "labels": [-100] * (n - 1) + [1]} for n in (2, 4, 6, 8)]
    assert percentile([2, 4, 6, 8], 90) == 8
    assert length_stats(rows) == {
        "sequences": 4,
        "tokens": 20,
        "p50": 4,
        "p90": 8,
        "p99": 8,
        "max": 8,
        "trained_share": 4 / 20,
    }


def _config(tmp_path, model_dir, data_dir) -> list[str]:
    return [
        f"model_name_or_path={model_dir}",
        f"dataset_dir={data_dir}",
        "dataset=toy",
        "cutoff_len=64",
        f"output_dir={tmp_path / 'out'}",
        "do_train=true",
        f"tokenized_cache_dir={tmp_path / 'cache'}",
    ]


def test_preview_and_preprocess_commands(tmp_path, tiny_model_dir, tiny_tokenizer, toy_data_dir, capsys):
    from tests.conftest import TOY_ROWS

    from sftflow.cli import main
    from sftflow.data.converters import alpaca_to_messages
    from sftflow.data.processor import encode_sft
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
    key = lambda r: r["input_ids"]  # noqa: E731 - the train set is shuffled: compare as sets
    assert sorted(written, key=key) == sorted(expected, key=key)
