"""report.html: every section present, images inline and valid PNG, nothing external, text escaped."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from sftflow.cli import main
from sftflow.config import load_args
from sftflow.data.audit import write_stats
from sftflow.data.prepare import prepare
from sftflow.tools.report import SECTIONS, write_report
from sftflow.train.plotting import plot_losses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Sections, images, links, scripts and table rows of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self.rows: dict[str, list[list[str]]] = {}
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
            self.sections.append(self._section)
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag in ("a", "link"):
            self.links.append(attrs.get("href", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def fake_run(out: Path, model_dir: Path, data_dir: Path, tokenizer) -> None:
    """The files a finished LoRA run with predict leaves behind."""
    out.mkdir()
    tokenizer.save_pretrained(out)
    config = {
        "model_name_or_path": str(model_dir),
        "dataset_dir": str(data_dir),
        "dataset": ["toy"],
        "eval_dataset": ["toy_heldout"],
        "cutoff_len": 128,
        "finetuning_type": "lora",
        "output_dir": str(out),
        "do_train": True,
        "learning_rate": 0.001,
    }
    (out / "sftflow_args.yaml").write_text(yaml.safe_dump(config))
    args = load_args(out / "sftflow_args.yaml", [f"tokenized_cache_dir={out.parent / 'cache'}"])
    write_stats(prepare("sft", args.data, tokenizer, args.training.seed).meta, out)  # what the run writes
    metrics = {
        "epoch": 3.0,
        "train_loss": 1.62,
        "eval_loss": 0.97,
        "predict_rouge-l": 60.5,
        "predict_base_rouge-l": 20.7,
        "predict_bleu-4": 37.0,
        "predict_base_bleu-4": 40.0,
        "predict_runtime": 7.7,
        "predict_base_runtime": 14.2,
    }
    (out / "all_results.json").write_text(json.dumps(metrics))
    log = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.97}]
    (out / "trainer_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    plot_losses(log, out)
    prompts = [f"<|im_start|>user\nWhat is {i} plus 1?<|im_end|>\n<|im_start|>assistant\n" for i in range(3)]
    for name, answers in (
        (
            "generated_predictions.jsonl",
            ["1 plus 1 is 2. Wren", "<script>alert(1)</script>", "3 plus 1 is 4."],
        ),
        ("generated_predictions_base.jsonl", ["Two.", "I do not know.", "Four!"]),
    ):
        rows = [
            {"prompt": p, "predict": a, "label": f"{i} plus 1 is {i + 1}. Wren"}
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        ]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_has_every_section_inline_images_and_escapes_text(
    tmp_path, tiny_model_dir, tiny_tokenizer, toy_data_dir
):
    out = tmp_path / "run"
    fake_run(out, tiny_model_dir, toy_data_dir, tiny_tokenizer)
    for path in toy_data_dir.glob("*.json"):  # the report reads the run's files, never the datasets
        path.unlink()
    assert main(["report", str(out)]) == 0
    page = parse(out / "report.html")

    assert page.sections == list(SECTIONS)
    assert page.scripts == 0  # the model's "<script>" answer is text, not markup
    assert all(link.startswith("#") for link in page.links)  # offline: in-page anchors only
    # the loss curve and the length histogram, each a valid PNG inlined as base64; the eval loss,
    # logged once, is a number rather than a one-dot chart
    assert len(page.images) == 2
    assert "eval_loss: 0.97 (logged once, at step 5)" in (out / "report.html").read_text()
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)

    # the keys the run changed come first: the fake run's own keys (sorted), then defaults
    firsts = [row[0] for row in page.rows["config"][1:4]]
    assert firsts == ["cutoff_len", "dataset", "dataset_dir"]
    config = {row[0]: row[1] for row in page.rows["config"][1:]}
    config.update({row[2]: row[3] for row in page.rows["config"][1:] if row[2]})
    assert config["learning_rate"] == "0.001" and config["finetuning_type"] == "lora"
    data = {row[0]: row[1] for row in page.rows["data"][1:]}
    assert data["train / held out"] == "18 / 4"
    assert data["at cutoff_len 128"] == "0 truncated, 0 dropped"
    assert data["end-of-turn token trained"] == "18 of 18 (<|im_end|>)"
    assert ["eval_loss", "0.97"] in page.rows["metrics"]
    assert page.rows["base-vs-tuned"][1:] == [
        ["rouge-l", "20.7", "60.5", "+39.8"],
        ["bleu-4", "40", "37", "-3"],
    ]
    samples = page.rows["samples"]
    assert samples[0] == ["#", "prompt", "reference", "base answer", "tuned answer"]
    assert samples[2][1:] == [
        "<|im_start|>user\nWhat is 1 plus 1?<|im_end|>\n<|im_start|>assistant",
        "1 plus 1 is 2. Wren",
        "I do not know.",
        "<script>alert(1)</script>",
    ]


def test_report_of_a_partial_run_says_what_is_missing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "all_results.json").write_text(json.dumps({"train_loss": 2.0}))
    path = write_report(out)
    page = parse(path)
    assert page.sections == list(SECTIONS)
    assert page.images == []
    text = path.read_text()
    assert "no sftflow_args.yaml" in text and "no generated_predictions.jsonl" in text
    assert "predict did not run on both" in text

    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "is it the output_dir" in capsys.readouterr().err


@pytest.mark.integration
def test_train_writes_the_report(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    from sftflow.config import load_args
    from sftflow.stages.sft import run_sft

    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(toy_data_dir),
        "dataset": "toy",
        "eval_dataset": "toy_heldout",
        "cutoff_len": 64,
        "lora_rank": 4,
        "output_dir": str(tmp_path / "out"),
        "do_train": True,
        "do_eval": True,
        "do_predict": True,
        "predict_with_generate": True,
        "max_new_tokens": 4,
        "per_device_train_batch_size": 6,
        "max_steps": 2,
        "logging_steps": 1,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_sft(load_args(path))
    assert result.report == tmp_path / "out" / "report.html"
    assert f"report: {result.report.resolve()}" in capsys.readouterr().out
    page = parse(result.report)
    assert page.sections == list(SECTIONS)
    assert len(page.rows["samples"]) == 1 + 4  # header + the 4 held-out rows
    assert {row[0] for row in page.rows["base-vs-tuned"][1:]} == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}


def test_report_of_a_reward_model_shows_the_scored_pairs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75, "predict_accuracy": 0.5}))
    pair = {"prompt": "Q?", "chosen": "good", "rejected": "bad", "chosen_score": 1.5, "rejected_score": -0.5}
    (out / "generated_predictions.jsonl").write_text(json.dumps(pair) + "\n")
    page = parse(write_report(out))
    assert page.rows["samples"][1] == ["0", "Q?", "good", "bad", "1.5", "-0.5"]
    assert ["eval_accuracy", "0.75"] in page.rows["base-vs-tuned"]  # the outcome, as numbers
