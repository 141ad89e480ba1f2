"""Registry lookup, file formats, row conversion and its error messages, splitting."""

from __future__ import annotations

import json

import pytest

from sftflow.config import DataArguments
from sftflow.data.converters import RowError, alpaca_to_messages, sharegpt_to_messages
from sftflow.data.loader import load_conversations, split_train_eval
from sftflow.data.registry import ALPACA_COLUMNS, SHAREGPT_COLUMNS, SHAREGPT_TAGS, get_dataset_spec
from sftflow.errors import SftflowError


def test_alpaca_row_with_system_history_and_input():
    row = {
        "system": "S",
        "instruction": "Fix",
        "input": "teh cat",
        "output": "the cat",
        "history": [["hi", "hello"]],
    }
    assert alpaca_to_messages(row, ALPACA_COLUMNS) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Fix\nteh cat"},
        {"role": "assistant", "content": "the cat"},
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "q", "output": "  "}, "response .* is empty"),
        ({"instruction": "", "input": "", "output": "a"}, "both empty"),
        ({"instruction": "q", "output": 3}, "should be a string"),
        ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"history\[0\]"),
    ],
)
def test_bad_alpaca_rows_raise_row_errors(row, message):
    with pytest.raises(RowError, match=message):
        alpaca_to_messages(row, ALPACA_COLUMNS)


def test_sharegpt_and_openai_messages():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "system": "S"}
    assert sharegpt_to_messages(row, SHAREGPT_COLUMNS, SHAREGPT_TAGS) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    openai = {
        "conversations": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert [m["role"] for m in sharegpt_to_messages(openai, SHAREGPT_COLUMNS, SHAREGPT_TAGS)] == [
        "system",
        "user",
        "assistant",
    ]


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"from": "human", "value": "hi"}], "must end with an assistant turn"),
        ([{"from": "bot", "value": "hi"}], "has role 'bot'"),
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
            r"conversations\[1\] is .human. but an assistant",
        ),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], "empty or non-string"),
    ],
)
def test_bad_sharegpt_rows(turns, message):
    with pytest.raises(RowError, match=message):
        sharegpt_to_messages({"conversations": turns}, SHAREGPT_COLUMNS, SHAREGPT_TAGS)


def _data_args(tmp_path, **kwargs) -> DataArguments:
    return DataArguments(dataset_dir=str(tmp_path), **kwargs)


def test_unknown_dataset_name_suggests_the_closest(toy_data_dir):
    with pytest.raises(SftflowError, match="Did you mean 'toy'"):
        get_dataset_spec("tyo", toy_data_dir)
    with pytest.raises(SftflowError, match="no dataset registry"):
        get_dataset_spec("toy", toy_data_dir / "missing")


def test_missing_file_and_malformed_rows_name_file_and_row(toy_data_dir):
    registry = json.loads((toy_data_dir / "dataset_info.json").read_text())
    registry["ghost"] = {"file_name": "ghost.json"}
    registry["bad"] = {"file_name": "bad.jsonl"}
    (toy_data_dir / "dataset_info.json").write_text(json.dumps(registry))
    rows = [
        {"instruction": "q", "output": "a"},
        {"instruction": "q", "output": ""},
        {"instruction": "q", "output": "a"},
    ]
    (toy_data_dir / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(SftflowError, match="ghost.json does not exist"):
        load_conversations(["ghost"], _data_args(toy_data_dir), seed=0)
    with pytest.raises(SftflowError, match=r"bad.jsonl.*1 of 3 rows are malformed[\s\S]*row 1: the response"):
        load_conversations(["bad"], _data_args(toy_data_dir), seed=0)


def test_missing_column_is_reported_with_the_columns_found(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    with pytest.raises(SftflowError, match=r"column\(s\) \['instruction', 'output'\] not found"):
        load_conversations(["d"], _data_args(tmp_path), seed=0)
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"d": {"file_name": "d.json", "columns": {"prompt": "question", "response": "answer"}}})
    )
    assert load_conversations(["d"], _data_args(tmp_path), seed=0)[0]["messages"][-1]["content"] == "a"


def test_csv_parquet_and_folder_sources_and_merging(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"instruction": ["q1", "q2"], "output": ["a1", "a2"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "folder").mkdir()
    frame.to_parquet(tmp_path / "folder" / "part-0.parquet")
    frame.to_parquet(tmp_path / "folder" / "part-1.parquet")
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"c": {"file_name": "d.csv"}, "p": {"file_name": "folder"}})
    )
    merged = load_conversations(["c", "p"], _data_args(tmp_path), seed=0)
    assert len(merged) == 6
    assert merged[2]["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
    ]
    assert len(load_conversations(["p"], _data_args(tmp_path, max_samples=3), seed=0)) == 3


def test_val_size_split_is_seeded_and_disjoint(toy_data_dir):
    data = load_conversations(["toy"], _data_args(toy_data_dir), seed=0)
    train, held = split_train_eval(data, 0.25, seed=1)
    train2, held2 = split_train_eval(data, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 13
    assert held["messages"] == held2["messages"]
    assert not {str(m) for m in held["messages"]} & {str(m) for m in train["messages"]}
    assert len(split_train_eval(data, 4, seed=1)[1]) == 4
    with pytest.raises(SftflowError, match="leaves no training data"):
        split_train_eval(data, 18, seed=1)
