"""`sftflow eval` on a tiny run dir, offline: lm-eval in process on the tuned model and its base, results
in eval_harness.json; and lm-eval's local-completions client against `sftflow api` scores the shipped
task exactly as lm-eval in process does."""

from __future__ import annotations

import json

import pytest

from helpers import make_run_dir, serve
from sftflow.config.run_dir import infer_args
from sftflow.errors import SftflowError

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.integration  # lm-eval end to end on a run dir, and against a server


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):  # its own: `sftflow eval` writes into the run dir
    return make_run_dir(tiny_model_dir, tmp_path_factory.mktemp("run"))


def test_sftflow_eval_writes_tuned_and_base_results(run_dir, capsys):
    from sftflow.cli.eval import main

    assert main([str(run_dir), "--tasks", "wren_identity", "--limit", "8"]) == 0
    result = json.loads((run_dir / "eval_harness.json").read_text())
    assert result["tasks"] == ["wren_identity"] and result["limit"] == 8
    assert result["samples"] == {"wren_identity": 8}
    for variant in ("tuned", "base"):
        scores = result[variant]["wren_identity"]
        assert set(scores) >= {"acc", "acc_norm"} and all(0 <= scores[m] <= 1 for m in ("acc", "acc_norm"))
    assert result["adapter_name_or_path"] == str(run_dir)
    out = capsys.readouterr().out
    assert "wren_identity  acc" in out and "eval_harness.json" in out


def test_report_shows_the_lm_eval_results(run_dir):
    from sftflow.tools.report import build_html

    (run_dir / "eval_harness.json").write_text(
        json.dumps(
            {"tasks": ["t"], "tuned": {"t": {"acc": 0.75}}, "base": {"t": {"acc": 0.25}}, "limit": None}
        )
    )
    page = build_html(run_dir)
    section = page[page.index('id="lm-eval"') : page.index('id="curves"')]
    assert "Evaluation (lm-eval)" in section and "0.25" in section and "0.75" in section


def test_unknown_task_and_missing_tasks_are_user_errors(run_dir):
    from sftflow.tools.evaluate import evaluate

    args = infer_args(str(run_dir), [])
    with pytest.raises(SftflowError, match="unknown task.*wren_identity"):
        evaluate(args, ["hellaswag"], run_dir / "x", base=False)
    with pytest.raises(SftflowError, match="--tasks is empty"):
        evaluate(args, [], run_dir / "x")


def test_local_completions_against_sftflow_api_matches_in_process(run_dir, tmp_path):
    pytest.importorskip("openai")
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from sftflow.infer.api import create_app
    from sftflow.infer.engine import load_engine
    from sftflow.tools.evaluate import _scores, _task_dir, run_harness

    engine = load_engine(infer_args(str(run_dir), []), batched=True)
    tasks = _task_dir([], tmp_path)
    try:
        local = _scores(
            run_harness(engine.model, engine.tokenizer, ["wren_identity"], tasks, None, 4), ["wren_identity"]
        )
        with serve(create_app(engine)) as base_url:
            lm = LocalCompletionsAPI(
                base_url=f"{base_url}/completions",
                model="sftflow",
                tokenizer=str(run_dir),
                tokenizer_backend="huggingface",
                tokenized_requests=True,
                num_concurrent=2,
                max_retries=1,
            )
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=["wren_identity"],
                task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                log_samples=False,
                bootstrap_iters=0,
            )
        remote = _scores(raw, ["wren_identity"])
    finally:
        engine.close()
    assert remote["wren_identity"]["acc"] == pytest.approx(local["wren_identity"]["acc"])
    assert remote["wren_identity"]["acc_norm"] == pytest.approx(local["wren_identity"]["acc_norm"])
    assert raw["n-samples"]["wren_identity"]["effective"] == 16
