"""What the board's panels show (table rows, chart frames, progress, next output_dir) and who may open it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sftflow.board import runs, views


def finished_run(path: Path, losses: list[float]) -> Path:
    path.mkdir(parents=True)
    (path / runs.CONFIG_FILE).write_text(yaml.safe_dump({"model_name_or_path": "tiny", "dataset": ["toy"]}))
    log = [
        {"step": i + 1, "max_steps": len(losses), "elapsed_s": i + 1.0, "loss": v}
        for i, v in enumerate(losses)
    ]
    log.append({"step": len(losses), "eval_loss": 1.5})
    (path / "trainer_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    (path / "all_results.json").write_text(json.dumps({"train_loss": 2.0, "train_runtime": 75.0}))
    return path


def test_table_charts_and_progress(tmp_path):
    saves = tmp_path / "saves"
    finished_run(saves / "a", [3.0, 2.0])
    finished_run(saves / "b", [4.0, 3.0, 2.5])
    rows = {row[0]: row for row in views.runs_table(saves)}
    assert rows["a"][:3] == ["a", "finished", "sft"] and rows["a"][5] == "2/2"
    assert rows["a"][6] == "train_loss=2" and rows["a"][7] == "1m15s"
    frame = views.overlay_frame(saves, ["a", "b"], "loss")
    assert list(frame["series"]) == ["a", "a", "b", "b", "b"]
    assert str(frame["step"].dtype) == "int64" and str(frame["value"].dtype) == "float64"
    assert views.chart_value(views.overlay_frame(saves, [], "loss")) is None  # never an empty frame
    live = views.curve_frame(runs.curves(saves / "b"), {"loss": "raw", "loss_smoothed": "smoothed"})
    assert sorted(set(live["series"])) == ["raw", "smoothed"] and len(live) == 6
    text = views.progress_markdown(runs.read_run(saves / "b", saves))
    assert "finished" in text and "step 3 of 3 (100%)" in text and "train_loss 2" in text


def test_next_output_dir(tmp_path):
    saves = tmp_path / "saves"
    assert views.next_output_dir(saves, str(saves / "mine")) == str(saves / "mine")
    finished_run(saves / "used", [1.0])
    fresh = views.next_output_dir(saves, str(saves / "used"))
    assert fresh.startswith(str(saves / "run-"))
    assert views.next_output_dir(saves, str(tmp_path / "outside")).startswith(str(saves / "run-"))
    assert "sftflow train" in views.command_markdown({"output_dir": "saves/x"})


def test_data_page_marks_trained_tokens(tiny_model_dir, toy_data_dir, tmp_path):
    from sftflow.config.parser import args_from_dict

    args = args_from_dict(
        {
            "model_name_or_path": str(tiny_model_dir),
            "dataset_dir": str(toy_data_dir),
            "dataset": "toy",
            "do_train": True,
            "cutoff_len": 40,
            "tokenized_cache_dir": str(tmp_path / "cache"),
        },  # fmt: skip
        require_output_dir=False,
    )
    page = views.data_page(args, 2, size=3)
    assert "page 2 of 6 (18 examples" in page
    assert "<b>example 3</b>" in page and "<b>example 5</b>" in page and "example 6<" not in page
    assert page.count("<mark") >= 3 and "plus" in page
    assert "at cutoff_len: truncated" in page  # the toy rows are 45 tokens, cutoff_len 40
