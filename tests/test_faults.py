"""Faults: SIGKILL after a checkpoint and mid-save, SIGTERM, NaN loss, OOM, atomic checkpoints, exact resume.

Runs that must die are subprocesses (single-threaded, OMP_NUM_THREADS=1); the reference and resumed runs
run in this process, also single-threaded, so every run does the same float operations in the same order.
The three runs that are killed start together, to share their ~10 s of imports.
"""

from __future__ import annotations

import json
import signal

import pytest

from helpers import (
    MAX_STEPS,
    TOY_ROWS,
    Poison,
    adapter,
    fault_config,
    finish,
    is_complete,
    losses,
    max_diff,
    run_in_process,
    start_child,
    write_alpaca,
)
from sftflow.errors import SftflowError


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """An uninterrupted reference run, and three runs killed in different ways (started together)."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    data.mkdir()
    write_alpaca(data / "train.json", TOY_ROWS)
    (data / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "train.json"}}))
    children = {}
    for mode, step in [("kill_after_save", 4), ("kill_mid_save", 6), ("sigterm", 3)]:
        config = fault_config(root / f"{mode}.yaml", tiny_model_dir, data, root / mode)
        children[mode] = start_child(root, config, mode, step)
    reference = fault_config(root / "reference.yaml", tiny_model_dir, data, root / "reference")
    run_in_process(reference)
    done = finish(children)
    return root, done


@pytest.mark.integration
def test_sigkill_after_checkpoint_resumes_exactly(runs):
    root, done = runs
    returncode, _, stderr = done["kill_after_save"]
    assert returncode == -signal.SIGKILL, stderr[-2000:]
    out = root / "kill_after_save"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists()  # the killed run presented nothing as final
    before = losses(out)
    assert sorted(before) == [1, 2, 3, 4]

    run_in_process(root / "kill_after_save.yaml", "resume_from_checkpoint=true")
    reference = root / "reference"
    assert max_diff(adapter(out), adapter(reference)) <= 1e-6
    resumed, expected = losses(out), losses(reference)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    assert {s: resumed[s] for s in range(5, MAX_STEPS + 1)} == {
        s: expected[s] for s in range(5, MAX_STEPS + 1)
    }
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS


@pytest.mark.integration
def test_kill_mid_save_leaves_no_visible_checkpoint_and_resume_skips_it(runs):
    root, done = runs
    returncode, _, stderr = done["kill_mid_save"]
    assert returncode == -signal.SIGKILL, stderr[-2000:]
    out = root / "kill_mid_save"
    # The save of step 6 died after writing the adapter and optimizer: only the staging dir holds them.
    staged = out / ".tmp-checkpoint-6" / "checkpoint-6"
    assert (staged / "adapter_model.safetensors").is_file() and (staged / "optimizer.pt").is_file()
    assert not (staged / "trainer_state.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    run_in_process(root / "kill_mid_save.yaml", "resume_from_checkpoint=true")
    assert not (out / ".tmp-checkpoint-6").exists()  # the interrupted save was cleaned up
    assert max_diff(adapter(out), adapter(root / "reference")) <= 1e-6
    assert losses(out) == losses(root / "reference")


@pytest.mark.integration
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(runs):
    root, done = runs
    returncode, stdout, stderr = done["sigterm"]
    out = root / "sigterm"
    assert returncode == 2, stderr[-2000:]
    assert "training stopped by SIGTERM at step 3 of 8; checkpoint saved to" in stderr
    assert "resume_from_checkpoint=true" in stderr and "Traceback" not in stderr
    assert "run finished" not in stdout and not (out / "adapter_model.safetensors").exists()
    assert is_complete(out / "checkpoint-3")

    run_in_process(root / "sigterm.yaml", "resume_from_checkpoint=true")
    assert max_diff(adapter(out), adapter(root / "reference")) <= 1e-6


def test_resume_picks_latest_complete_checkpoint(tmp_path):
    from sftflow.train.checkpoints import resolve_resume

    for step, complete in [(2, True), (10, True), (12, False), (14, "marker")]:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if complete:
            (path / "trainer_state.json").write_text("{}")
        if complete == "marker":  # transformers' own JIT checkpoint sentinel
            (path / "checkpoint-is-incomplete.txt").write_text("in progress")
    (tmp_path / "checkpoint-99.tmp").mkdir()  # not a checkpoint name
    assert resolve_resume(tmp_path, "true") == str(tmp_path / "checkpoint-10")  # 10 > 2 numerically
    assert resolve_resume(tmp_path, True) == str(tmp_path / "checkpoint-10")
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    assert resolve_resume(tmp_path, None) is None and resolve_resume(tmp_path, "false") is None
    with pytest.raises(SftflowError, match=r"checkpoint-12 is incomplete"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-12"))
    with pytest.raises(SftflowError, match=r"no complete checkpoint in .*save_strategy: steps"):
        resolve_resume(tmp_path / "checkpoint-12", "latest")


def test_train_resolves_true_itself_and_passes_a_resolved_path_on(tmp_path):
    """One parser: a direct caller's `True` means the latest complete checkpoint; the path start_run
    resolved goes to the Trainer as it is (no second look at output_dir)."""
    from types import SimpleNamespace

    import torch

    from sftflow.train.trainer import Resilience

    class Recorder:  # stands in for a Trainer: records what train() was given
        def __init__(self) -> None:
            self.args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
            self.model = torch.nn.Linear(2, 1)

        def add_callback(self, callback) -> None:
            pass

        def train(self, resume_from_checkpoint=None, **kwargs):
            self.given = resume_from_checkpoint
            return "trained"

    class Trainer(Resilience, Recorder):
        pass

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    trainer = Trainer()
    for given, expected in [
        (True, str(tmp_path / "checkpoint-4")),
        ("latest", str(tmp_path / "checkpoint-4")),
        (False, None),
        (None, None),
        ("elsewhere/checkpoint-9", "elsewhere/checkpoint-9"),  # already resolved: not looked at again
    ]:
        assert trainer.train(resume_from_checkpoint=given) == "trained"
        assert trainer.given == expected, given


@pytest.mark.integration
def test_nan_loss_stops_naming_the_step(tmp_path, tiny_model_dir, toy_data_dir):
    config = fault_config(
        tmp_path / "run.yaml", tiny_model_dir, toy_data_dir, tmp_path / "out", save_strategy="no"
    )
    with pytest.raises(
        SftflowError, match=r"training loss is nan at step 3 \(epoch .*\); training stopped.*skip_nan"
    ):
        run_in_process(config, callbacks=[Poison(3, 1).callback])
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.integration
def test_skip_nan_skips_the_batch_and_keeps_training(tmp_path, tiny_model_dir, toy_data_dir, caplog):
    config = fault_config(
        tmp_path / "run.yaml", tiny_model_dir, toy_data_dir, tmp_path / "out", save_strategy="no"
    )
    with caplog.at_level("WARNING"):
        run_in_process(config, "skip_nan=true", callbacks=[Poison(3, 2).callback])
    assert "step 3: loss is nan; skipping this batch" in caplog.text
    assert "step 4: loss is nan; skipping this batch" in caplog.text
    weights = adapter(tmp_path / "out")
    assert all(v.isfinite().all() for v in weights.values())
    logged = losses(tmp_path / "out")
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    assert all(logged[s] == logged[s] for s in (1, 2, 5, 6, 7, 8))  # finite losses around the skipped steps


@pytest.mark.integration
def test_oom_message_names_the_knobs(tmp_path, tiny_model_dir, toy_data_dir):
    import torch
    from transformers import TrainerCallback

    class OutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    config = fault_config(
        tmp_path / "run.yaml", tiny_model_dir, toy_data_dir, tmp_path / "out", save_strategy="no"
    )
    with pytest.raises(SftflowError) as info:
        run_in_process(config, callbacks=[OutOfMemory()])
    message = str(info.value)
    assert message.startswith("out of memory during training")
    for knob in ("per_device_train_batch_size", "cutoff_len", "gradient_checkpointing", "quantization_bit"):
        assert knob in message


def test_launch_advice_for_several_gpus_without_torchrun():
    from sftflow.train.trainer import launch_advice

    advice = launch_advice(4, {})
    assert advice and "torchrun --nproc_per_node 4 -m sftflow.cli train CONFIG.yaml" in advice
    assert launch_advice(4, {"WORLD_SIZE": "4", "LOCAL_RANK": "0"}) is None
    assert launch_advice(1, {}) is None and launch_advice(0, {}) is None


@pytest.mark.integration
def test_overwrite_output_dir_drops_old_checkpoints(tmp_path, tiny_model_dir, toy_data_dir):
    out = tmp_path / "out"
    (out / "checkpoint-50").mkdir(parents=True)
    (out / "checkpoint-50" / "trainer_state.json").write_text("{}")
    config = fault_config(tmp_path / "run.yaml", tiny_model_dir, toy_data_dir, out, max_steps=2)
    run_in_process(config, "overwrite_output_dir=true")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
