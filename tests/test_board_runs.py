"""The board's run model: runs, their status and curves read from output dirs on disk; start refuses what
the CLI refuses and launches a detached `sftflow train` whose failure shows its `sftflow error:` line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from sftflow.board import models, runs
from sftflow.errors import SftflowError


def write_run(run: Path, log: list[dict], results: dict | None = None, status: dict | None = None) -> Path:
    run.mkdir(parents=True)
    config = {"model_name_or_path": "tiny", "stage": "sft", "dataset": "toy, other", "output_dir": str(run)}
    (run / runs.CONFIG_FILE).write_text(yaml.safe_dump(config))
    (run / "trainer_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log) + '{"step": 9, "lo')
    if results is not None:
        (run / "all_results.json").write_text(json.dumps(results))
    if status is not None:
        (run / runs.STATUS_FILE).write_text(json.dumps(status))
    return run


LOG = [
    {
        "step": 1,
        "max_steps": 4,
        "elapsed_s": 1.0,
        "loss": 4.0,
        "learning_rate": 1e-3,
        "grad_norm": 2.0,
        "tokens_per_second": 100.0,
        "peak_memory_gb": 0.5,
    },
    {
        "step": 2,
        "max_steps": 4,
        "elapsed_s": 2.0,
        "loss": 2.0,
        "learning_rate": 5e-4,
        "grad_norm": 1.0,
        "tokens_per_second": 120.0,
        "peak_memory_gb": 0.5,
    },
    {"step": 2, "max_steps": 4, "elapsed_s": 2.5, "eval_loss": 3.0},
]
DEAD = {"pid": 2**22 + 12345, "create_time": 1.0, "started_at": 1.0, "launches": 1}


def test_curves_from_the_log(tmp_path):
    run = write_run(tmp_path / "a", LOG)
    c = runs.curves(run)
    assert c["loss"] == [(1, 4.0), (2, 2.0)]
    assert c["eval_loss"] == [(2, 3.0)]
    assert c["learning_rate"] == [(1, 1e-3), (2, 5e-4)]
    assert c["grad_norm"][1] == (2, 1.0) and c["tokens_per_second"][0] == (1, 100.0)
    assert c["peak_memory_gb"] == [(1, 0.5), (2, 0.5)]
    smoothed = [v for _, v in c["loss_smoothed"]]
    assert smoothed[0] == 4.0 and 2.0 < smoothed[1] < 4.0  # the partial last line is skipped


def test_statuses_and_table(tmp_path):
    saves = tmp_path / "saves"
    write_run(
        saves / "m" / "lora" / "done",
        LOG,
        {"train_loss": 2.5, "eval_loss": 3.0, "train_runtime": 7.5},
        {**DEAD, "launches": 2, "earlier_s": 2.5},  # resumed once: 2.5 s trained before
    )
    (saves / "m" / "lora" / "done" / runs.LOG_FILE).write_text(f"{runs.LAUNCH_MARK}1 ===\nok\n")
    failed = write_run(saves / "failed", LOG[:1], None, DEAD)
    (failed / runs.LOG_FILE).write_text(
        f"{runs.LAUNCH_MARK}1 ===\nloading\nsftflow error: dataset 'toy' not found in data/dataset_info.json\n"
    )
    stopped = write_run(saves / "stopped", LOG[:2], None, DEAD)
    (stopped / runs.LOG_FILE).write_text(
        f"{runs.LAUNCH_MARK}1 ===\nsftflow error: dataset 'x' not found\n"  # an earlier launch's error
        f"{runs.LAUNCH_MARK}2 ===\nsftflow error: training stopped by SIGTERM at step 2 of 4; checkpoint saved\n"
    )
    early = write_run(saves / "early", [], None, {**DEAD, "stop_requested": True})
    (early / runs.LOG_FILE).write_text(f"{runs.LAUNCH_MARK}1 ===\nloading\n")
    alive = {"pid": os.getpid(), "create_time": None, "started_at": time.time() - 3}
    write_run(saves / "live", LOG[:2], None, alive)
    (saves / "checkpoint-3").mkdir(parents=True)  # not a run
    table = {r.name: r for r in runs.list_runs(saves)}
    assert set(table) == {"m/lora/done", "failed", "stopped", "live", "early"}
    assert table["early"].status == "stopped" and "before training began" in table["early"].error
    done = table["m/lora/done"]
    assert (done.status, done.stage, done.model, done.datasets) == (
        "finished",
        "sft",
        "tiny",
        ["toy", "other"],
    )
    assert (done.step, done.max_steps, done.duration_s) == (2, 4, 10.0)
    assert done.metrics == {"train_loss": 2.5, "eval_loss": 3.0}
    assert table["failed"].status == "failed"
    assert table["failed"].error == "sftflow error: dataset 'toy' not found in data/dataset_info.json"
    assert table["stopped"].status == "stopped" and "SIGTERM" in table["stopped"].error
    live = table["live"]
    assert live.status == "running" and live.pid == os.getpid()
    assert live.eta_s == pytest.approx(2.0)  # 2 s for 2 steps, 2 to go


def test_start_refuses_what_the_cli_refuses(tmp_path):
    saves = tmp_path / "saves"
    base = {"model_name_or_path": "m", "dataset": "toy", "do_train": True}
    with pytest.raises(SftflowError, match="lora_rank must be >= 1"):
        runs.start_run(saves, {**base, "output_dir": str(saves / "a"), "lora_rank": 0})
    with pytest.raises(SftflowError, match="not inside the board's saves dir"):
        runs.start_run(saves, {**base, "output_dir": str(tmp_path / "elsewhere")})
    (saves / "used").mkdir(parents=True)
    (saves / "used" / "x").write_text("x")
    with pytest.raises(SftflowError, match="already holds a run"):
        runs.start_run(saves, {**base, "output_dir": str(saves / "used")})
    assert not (saves / "a").exists()
    with pytest.raises(SftflowError, match="not running"):
        runs.stop_run(saves / "used")
    with pytest.raises(SftflowError, match="no train_config.yaml"):
        runs.resume_run(saves / "used")


@pytest.mark.integration
def test_a_failed_launch_shows_its_error_line(tmp_path, tiny_model_dir, toy_data_dir):
    saves = tmp_path / "saves"
    keys = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(toy_data_dir),
        "dataset": "no_such_data",
        "do_train": True,
        "output_dir": str(saves / "bad"),
    }
    run_dir = runs.start_run(saves, keys, cwd=tmp_path)
    config = yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text())
    assert config["dataset"] == ["no_such_data"] or config["dataset"] == "no_such_data"
    assert config["overwrite_output_dir"] is True
    assert (
        (run_dir / runs.CONFIG_FILE).read_text().startswith(f"# sftflow train {run_dir / runs.CONFIG_FILE}")
    )
    deadline = time.time() + 120
    while runs.run_status(run_dir)[0] == "running" and time.time() < deadline:
        time.sleep(0.5)
    status, error = runs.run_status(run_dir)
    assert status == "failed", (run_dir / runs.LOG_FILE).read_text()[-2000:]
    assert error.startswith("sftflow error:") and "no_such_data" in error
    with pytest.raises(SftflowError, match="no complete checkpoint"):
        runs.resume_run(run_dir)


def test_the_models_of_a_run(tmp_path):
    lora = write_run(tmp_path / "lora", LOG)
    with pytest.raises(SftflowError, match="no trained weights yet"):
        models.tuned_keys(lora)
    (lora / "adapter_config.json").write_text("{}")
    assert models.base_keys(lora) == {"model_name_or_path": "tiny", "stage": "sft", "dataset": "toy, other"}
    assert models.tuned_keys(lora)["adapter_name_or_path"] == str(lora)
    config = yaml.safe_load((lora / runs.CONFIG_FILE).read_text())
    (lora / runs.CONFIG_FILE).write_text(yaml.safe_dump({**config, "adapter_name_or_path": "a1,a2"}))
    assert models.tuned_keys(lora)["adapter_name_or_path"] == f"a1,{lora}"  # a2 continued into the run
    (lora / runs.CONFIG_FILE).write_text(
        yaml.safe_dump({**config, "adapter_name_or_path": ["a1", "a2"], "create_new_adapter": True})
    )
    assert models.tuned_keys(lora)["adapter_name_or_path"] == f"a1,a2,{lora}"
    full = write_run(tmp_path / "full", LOG)
    (full / "config.json").write_text("{}")
    assert models.tuned_keys(full)["model_name_or_path"] == str(full)


def test_a_reused_pid_is_not_the_run(tmp_path):
    import psutil

    me = psutil.Process(os.getpid())
    assert runs.process_alive({"pid": os.getpid(), "create_time": me.create_time()})
    assert not runs.process_alive({"pid": os.getpid(), "create_time": me.create_time() - 100})  # reused
    assert not runs.process_alive({"pid": None})
