"""ROUGE/BLEU on known strings, and the loss plot."""

import pytest

from sftflow.train.metrics import text_metrics, tokenize
from sftflow.train.plotting import plot_losses, smooth


def test_tokenize_splits_words_and_cjk_characters():
    assert tokenize("Hello, World! 你好 x2") == ["hello", "world", "你", "好", "x2"]


def test_identical_and_disjoint_texts():
    same = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    none = text_metrics(["dog runs"], ["the cat sat"])
    assert none["rouge-1"] == 0.0 and none["rouge-l"] == 0.0 and none["bleu-4"] < 10


def test_partial_overlap_matches_hand_computed_rouge():
    # pred tokens: a b c d ; ref tokens: a b x ; unigram overlap 2 -> P=2/4, R=2/3, F=4/7
    # bigram overlap (a b) 1 -> P=1/3, R=1/2, F=0.4 ; LCS = 2 -> same as rouge-1
    m = text_metrics(["A b, c d"], ["a b x"])
    assert m["rouge-1"] == pytest.approx(100 * 4 / 7, abs=1e-3)
    assert m["rouge-2"] == pytest.approx(40.0, abs=1e-3)
    assert m["rouge-l"] == pytest.approx(100 * 4 / 7, abs=1e-3)


def test_chinese_is_scored_by_character():
    m = text_metrics(["我爱北京"], ["我爱上海"])
    assert m["rouge-1"] == pytest.approx(50.0, abs=1e-3)  # 2 of 4 characters shared


def test_averaging_and_empty_predictions():
    m = text_metrics(["a b", ""], ["a b", "a b"])
    assert m["rouge-1"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        text_metrics(["a"], [])


def test_plot_losses_writes_pngs(tmp_path):
    history = [{"step": i, "loss": 3.0 / i} for i in range(1, 8)] + [{"step": 7, "eval_loss": 1.2}]
    paths = plot_losses(history, tmp_path)
    assert [p.name for p in paths] == ["training_loss.png", "training_eval_loss.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert plot_losses([], tmp_path) == []


def test_smooth_tracks_a_constant_and_lags_a_step():
    assert smooth([2.0] * 5) == [2.0] * 5
    out = smooth([0.0] * 5 + [1.0] * 5)
    assert out[4] == 0.0 and 0.0 < out[5] < 1.0 and out == sorted(out)


def test_plots_drawn_in_a_staging_dir_are_titled_with_the_run(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda self, text, *a, **k: titles.append(text))
    stage = tmp_path / "demo" / ".tmp-final"
    stage.mkdir(parents=True)
    plot_losses([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], stage, "demo")
    plot_losses([{"step": 1, "loss": 2.0}], tmp_path / "demo")
    assert titles == ["train loss of demo", "train loss of demo"]
