"""Bad input gives an SftflowError naming dataset, file, row/line and field, or is skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftflow.config import DataArguments
from sftflow.data.loader import LoadReport, load_conversations
from sftflow.errors import SftflowError

GOOD = {"instruction": "q", "output": "a"}


def setup(tmp_path: Path, name: str, text: str, entry: dict | None = None) -> DataArguments:
    (tmp_path / name).write_text(text)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": name, **(entry or {})}}))
    return DataArguments(dataset_dir=str(tmp_path))


def test_malformed_jsonl_line_is_named_or_skipped_and_counted(tmp_path, caplog):
    text = "\n".join([json.dumps(GOOD), '{"instruction": "q", "output": ', json.dumps(GOOD)])
    args = setup(tmp_path, "d.jsonl", text)
    with pytest.raises(
        SftflowError, match=r"dataset 'd'.*line 2 of .*d.jsonl is not valid JSON.*skip_bad_rows"
    ):
        load_conversations(["d"], args, seed=0)
    args.skip_bad_rows = True
    report = LoadReport()
    assert len(load_conversations(["d"], args, seed=0, report=report)) == 2
    assert (report.datasets["d"].read, report.datasets["d"].skipped) == (3, 1)
    assert "skipped 1 malformed rows of 3" in caplog.text


def test_broken_json_array_names_line_and_column(tmp_path):
    args = setup(
        tmp_path,
        "d.json",
        '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]',
    )
    with pytest.raises(
        SftflowError, match=r"d.json is not valid JSON: Expecting ',' delimiter at line 3, column"
    ):
        load_conversations(["d"], args, seed=0)


def test_wrong_type_in_one_row_names_row_and_field(tmp_path):
    args = setup(tmp_path, "d.json", json.dumps([GOOD, {"instruction": "q", "output": 3}, GOOD]))
    with pytest.raises(
        SftflowError,
        match=r"d.json: 1 of 3 rows are malformed[\s\S]*row 1: column 'output' should be a string, got int 3",
    ):
        load_conversations(["d"], args, seed=0)
    args.skip_bad_rows = True
    assert len(load_conversations(["d"], args, seed=0)) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "", "input": "", "output": "a"}, "row 1: the instruction .* both empty"),
        ({"instruction": "q", "output": " "}, r"row 1: the response \('output'\) is empty"),
    ],
)
def test_empty_instruction_or_output(tmp_path, row, message):
    args = setup(tmp_path, "d.json", json.dumps([GOOD, row]))
    with pytest.raises(SftflowError, match=message):
        load_conversations(["d"], args, seed=0)


def test_odd_sharegpt_role_order_and_unknown_role(tmp_path):
    turns = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    args = setup(tmp_path, "d.json", json.dumps([{"conversations": turns}]), {"formatting": "sharegpt"})
    with pytest.raises(SftflowError, match=r"row 0: conversations\[1\] is 'human' but an assistant"):
        load_conversations(["d"], args, seed=0)
    turns = [{"from": "user", "value": "a"}, {"from": "gpt", "value": "c"}]
    setup(tmp_path, "d.json", json.dumps([{"conversations": turns}]), {"formatting": "sharegpt"})
    with pytest.raises(SftflowError, match=r"conversations\[0\] has role 'user'.*tags.user_tag"):
        load_conversations(["d"], args, seed=0)


def test_missing_or_misnamed_column_and_all_rows_bad(tmp_path):
    args = setup(tmp_path, "d.json", json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(SftflowError, match=r"column\(s\) \['instruction', 'output'\] not found.*\"columns\""):
        load_conversations(["d"], args, seed=0)
    args = setup(tmp_path, "d.json", json.dumps([{"instruction": "q", "output": ""}]))
    args.skip_bad_rows = True
    with pytest.raises(SftflowError, match="no usable rows .1 skipped"):
        load_conversations(["d"], args, seed=0)


def test_registry_mistakes(tmp_path):
    args = setup(tmp_path, "d.json", json.dumps([GOOD]), {"columns": {"videos": "vid"}})
    with pytest.raises(SftflowError, match="videos and audios are not supported"):
        load_conversations(["d"], args, seed=0)
    setup(tmp_path, "d.json", json.dumps([GOOD]), {"formatting": "chatml"})
    with pytest.raises(SftflowError, match="formatting 'chatml'; use alpaca, sharegpt or openai"):
        load_conversations(["d"], args, seed=0)
    setup(tmp_path, "d.json", json.dumps([GOOD]), {"file_name": "nope.json"})
    with pytest.raises(SftflowError, match=r"file .*nope.json does not exist. Fix file_name"):
        load_conversations(["d"], args, seed=0)
    with pytest.raises(SftflowError, match="dataset 'e' is not in .*Registered: d"):
        load_conversations(["e"], args, seed=0)


def test_hub_failure_says_offline_and_what_to_do(tmp_path, monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"h": {"hf_hub_url": "someone/data"}}))
    with pytest.raises(
        SftflowError, match=r"dataset 'h' \(someone/data\).*HF_HUB_OFFLINE is set.*file_name instead"
    ):
        load_conversations(["h"], DataArguments(dataset_dir=str(tmp_path)), seed=0)


def test_cli_prints_data_errors_without_traceback(tmp_path, tiny_model_dir, capsys):
    from sftflow.cli import main

    setup(tmp_path, "d.jsonl", "{not json}\n")
    code = main(
        [
            "preview",
            f"model_name_or_path={tiny_model_dir}",
            f"dataset_dir={tmp_path}",
            "dataset=d",
            f"output_dir={tmp_path / 'o'}",
            f"tokenized_cache_dir={tmp_path / 'c'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "sftflow error: dataset 'd'" in err and "line 1" in err and "Traceback" not in err
