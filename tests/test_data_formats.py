"""Every dataset_info.json format and source read into the common form, mixing, sampling, streaming, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import as_overrides, train_config
from sftflow.config import DataArguments
from sftflow.data.loader import LoadReport, load_conversations, split_train_eval
from sftflow.errors import SftflowError


def registry(tmp_path: Path, entries: dict) -> None:
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))


def args(tmp_path: Path, **kwargs) -> DataArguments:
    return DataArguments(dataset_dir=str(tmp_path), **kwargs)


def test_sharegpt_custom_tags_system_turn_tools_and_function_calls(tmp_path):
    row = {
        "dialog": [
            {"speaker": "sys", "text": "Use tools."},
            {"speaker": "me", "text": "Weather in Paris?"},
            {"speaker": "call", "text": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"speaker": "result", "text": '{"temp": 21}'},
            {"speaker": "bot", "text": "21 degrees."},
        ],
        "tools": [{"name": "weather", "parameters": {"city": "string"}}],
    }
    (tmp_path / "chats.jsonl").write_text(json.dumps(row) + "\n")
    tags = {
        "role_tag": "speaker",
        "content_tag": "text",
        "user_tag": "me",
        "assistant_tag": "bot",
        "system_tag": "sys",
        "function_tag": "call",
        "observation_tag": "result",
    }
    registry(
        tmp_path,
        {
            "c": {
                "file_name": "chats.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "dialog"},
                "tags": tags,
            }
        },
    )
    out = load_conversations(["c"], args(tmp_path), seed=0)[0]
    assert out["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
    ]
    assert json.loads(out["tools"]) == row["tools"]


def test_openai_formatting_and_arrow_source(tmp_path):
    from datasets import Dataset

    rows = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "unused.parquet"))
    folder = tmp_path / "arrow"
    Dataset.from_list(rows).save_to_disk(str(folder))  # writes data-00000-of-00001.arrow
    registry(tmp_path, {"o": {"file_name": "arrow", "formatting": "openai"}})
    out = load_conversations(["o"], args(tmp_path), seed=0)
    assert out["messages"] == [rows[0]["messages"], rows[1]["messages"]]
    assert out["tools"] == ["", ""]


def test_pt_text_rows(tmp_path):
    (tmp_path / "c4.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one doc", "two doc"]))
    registry(tmp_path, {"c4": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}}})
    out = load_conversations(["c4"], args(tmp_path), seed=0, stage="pt")
    assert out.column_names == ["text"] and out["text"] == ["one doc", "two doc"]


def test_rm_pairwise_rows_sharegpt_and_alpaca(tmp_path):
    share = {
        "conversations": [{"from": "human", "value": "Hi?"}],
        "chosen": {"from": "gpt", "value": "Hello!"},
        "rejected": {"from": "gpt", "value": "Go away."},
    }
    alpaca = {"instruction": "Sum", "input": "1+1", "chosen": "2", "rejected": "3"}
    (tmp_path / "s.json").write_text(json.dumps([share]))
    (tmp_path / "a.json").write_text(json.dumps([alpaca]))
    registry(
        tmp_path,
        {
            "s": {
                "file_name": "s.json",
                "ranking": True,
                "formatting": "sharegpt",
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
            },
            "a": {"file_name": "a.json", "ranking": True},
        },
    )
    out = load_conversations(["s", "a"], args(tmp_path), seed=0, stage="rm")
    assert out[0] == {
        "messages": [{"role": "user", "content": "Hi?"}],
        "chosen": "Hello!",
        "rejected": "Go away.",
        "tools": "",
    }
    assert out[1] == {
        "messages": [{"role": "user", "content": "Sum\n1+1"}],
        "chosen": "2",
        "rejected": "3",
        "tools": "",
    }
    with pytest.raises(SftflowError, match="pairwise .ranking: true.*cannot be used in the sft stage"):
        load_conversations(["s"], args(tmp_path), seed=0)


def _two_datasets(tmp_path: Path) -> None:
    for name, size in (("a", 4), ("b", 10)):
        rows = [{"instruction": f"{name}{i}", "output": "x"} for i in range(size)]
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    registry(tmp_path, {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}})


def _firsts(dataset) -> list[str]:
    return [m[0]["content"] for m in dataset["messages"]]


def test_mixing_concat_and_seeded_interleave(tmp_path):
    _two_datasets(tmp_path)
    concat = load_conversations(["a", "b"], args(tmp_path), seed=0)
    assert _firsts(concat) == [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(10)]
    under = load_conversations(["a", "b"], args(tmp_path, mix_strategy="interleave_under"), seed=0)
    assert _firsts(under) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]  # stops when a runs out
    over = load_conversations(["a", "b"], args(tmp_path, mix_strategy="interleave_over"), seed=0)
    assert len(over) == 20 and _firsts(over)[8:10] == ["a0", "b4"]  # a repeats until b runs out
    kwargs = {"mix_strategy": "interleave_under", "interleave_probs": [0.2, 0.8]}
    first = _firsts(load_conversations(["a", "b"], args(tmp_path, **kwargs), seed=3))
    assert first == _firsts(load_conversations(["a", "b"], args(tmp_path, **kwargs), seed=3))
    assert first != _firsts(load_conversations(["a", "b"], args(tmp_path, **kwargs), seed=4))
    assert sum(x.startswith("b") for x in first) > sum(x.startswith("a") for x in first)
    with pytest.raises(SftflowError, match="one probability per dataset"):
        DataArguments(dataset=["a", "b"], mix_strategy="interleave_under", interleave_probs=[1.0])


def test_max_samples_num_samples_and_report(tmp_path):
    _two_datasets(tmp_path)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["b"]["num_samples"] = 15  # more than the 10 rows: all 10 once, then 5 drawn again, seeded
    registry(tmp_path, info)
    report = LoadReport()
    out = load_conversations(["a", "b"], args(tmp_path, max_samples=12), seed=0, report=report)
    assert len(out) == 4 + 12
    b_rows = _firsts(load_conversations(["b"], args(tmp_path), seed=0))
    assert len(b_rows) == 15 and set(b_rows) == {f"b{i}" for i in range(10)}
    assert b_rows == _firsts(load_conversations(["b"], args(tmp_path), seed=0))
    assert report.datasets["a"].read == 4 and report.datasets["b"].kept == 12


def test_streaming_reads_lazily_with_take_and_count_split(tmp_path):
    from datasets import IterableDataset

    _two_datasets(tmp_path)
    stream = load_conversations(["b"], args(tmp_path, streaming=True, max_samples=6), seed=0)
    assert isinstance(stream, IterableDataset)
    train, held = split_train_eval(stream, 2, seed=0)
    assert [r["messages"][0]["content"] for r in held] == ["b0", "b1"]
    assert [r["messages"][0]["content"] for r in train] == ["b2", "b3", "b4", "b5"]
    with pytest.raises(SftflowError, match="number of examples"):
        DataArguments(streaming=True, val_size=0.1)


def _run_args(tmp_path: Path, model_dir: Path, data_dir: Path, **extra):
    from sftflow.config import load_args

    values = {"dataset": "a", "tokenized_cache_dir": str(tmp_path / "cache"), **extra}
    return load_args(None, as_overrides(train_config(model_dir, data_dir, tmp_path / "out", **values)))


def test_tokenized_cache_reuses_and_rebuilds_on_any_change(tmp_path, tiny_model_dir, tiny_tokenizer):
    from sftflow.data.prepare import prepare

    def prepare_datasets(args, tokenizer):
        return prepare(
            args.finetuning.stage, args.data, tokenizer, args.training.seed, args.training.do_train
        )

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _two_datasets(data_dir)

    def entries() -> set[str]:
        return {p.name for p in (tmp_path / "cache").iterdir()} if (tmp_path / "cache").exists() else set()

    first = prepare_datasets(_run_args(tmp_path, tiny_model_dir, data_dir), tiny_tokenizer)
    assert len(entries()) == 1
    again = prepare_datasets(_run_args(tmp_path, tiny_model_dir, data_dir), tiny_tokenizer)
    assert entries() == entries() and len(entries()) == 1
    assert again.train["input_ids"] == first.train["input_ids"] and again.meta == first.meta
    prepare_datasets(_run_args(tmp_path, tiny_model_dir, data_dir, cutoff_len=48), tiny_tokenizer)
    prepare_datasets(_run_args(tmp_path, tiny_model_dir, data_dir, train_on_prompt="true"), tiny_tokenizer)
    assert len(entries()) == 3
    rows = json.loads((data_dir / "a.json").read_text())
    rows[0]["output"] = "changed"
    (data_dir / "a.json").write_text(json.dumps(rows))
    changed = prepare_datasets(_run_args(tmp_path, tiny_model_dir, data_dir), tiny_tokenizer)
    assert len(entries()) == 4 and changed.train["input_ids"] != first.train["input_ids"]
    other = tiny_tokenizer.__class__.from_pretrained(tiny_model_dir)
    other.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    prepare_datasets(_run_args(tmp_path, tiny_model_dir, data_dir), other)
    assert len(entries()) == 5
    (Path(tmp_path / "cache") / sorted(entries())[0] / "meta.json").write_text("{}")  # forced rebuild below
    forced = prepare_datasets(
        _run_args(tmp_path, tiny_model_dir, data_dir, overwrite_cache="true"), tiny_tokenizer
    )
    assert forced.train["input_ids"] == changed.train["input_ids"] and len(entries()) == 5
