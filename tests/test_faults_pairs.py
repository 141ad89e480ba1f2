"""Faults for the pair stages (rm on TRL's RewardTrainer, dpo on its DPOTrainer), covered as sft is in
test_faults.py: kill -9 after a checkpoint and exact resume, SIGTERM, NaN loss, throughput logs; and the
private Trainer/TRL methods `Resilience` and the dpo recipe override, so a library upgrade that renames
one fails here.

The killed runs are test_faults.py's child (subprocesses, started together); the reference, SIGTERM and
resumed runs run in this process, single-threaded like the children.
"""

from __future__ import annotations

import doctest
import inspect
import json
import os
import signal
from pathlib import Path

import pytest

from helpers import (
    Poison,
    adapter,
    finish,
    is_complete,
    losses,
    max_diff,
    run_in_process,
    start_child,
    train_config,
    write_config,
    write_pairs,
)
from sftflow.errors import SftflowError

STEPS = 6
STAGES = ["rm", "dpo"]


def pair_config(path: Path, model_dir: Path, data_dir: Path, out: Path, stage: str, **overrides) -> Path:
    """A tiny rm/dpo run: LoRA, batch 2, STEPS steps, a checkpoint every 2 steps, no eval."""
    values = {
        "stage": stage,
        "dataset": "pairs",
        "lora_rank": 4,
        **({"pref_beta": 0.5} if stage == "dpo" else {}),  # rm has no beta: the key would be refused
        "tokenized_cache_dir": str(out.parent / f"cache-{out.name}"),  # concurrent runs share no entry
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "max_steps": STEPS,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "plot_loss": False,
        "seed": 7,
        "preview_rows": 0,
        **overrides,
    }
    return write_config(path, train_config(model_dir, data_dir, out, **values))


@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory, tiny_model_dir):
    """Per stage: an uninterrupted reference run, and a run killed (SIGKILL) right after saving step 4."""
    root = tmp_path_factory.mktemp("faults-pairs")
    data = root / "data"
    data.mkdir()
    write_pairs(data)
    children = {}
    for stage in STAGES:
        config = pair_config(
            root / f"{stage}-killed.yaml", tiny_model_dir, data, root / f"{stage}-killed", stage
        )
        children[stage] = start_child(root, config, "kill_after_save", 4)
    for stage in STAGES:
        run_in_process(pair_config(root / f"{stage}.yaml", tiny_model_dir, data, root / stage, stage))
    done = {stage: (code, stderr) for stage, (code, _, stderr) in finish(children).items()}
    return root, data, done


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_after_checkpoint_resumes_exactly(pair_runs, stage):
    root, _, done = pair_runs
    returncode, stderr = done[stage]
    assert returncode == -signal.SIGKILL, stderr[-2000:]
    out = root / f"{stage}-killed"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists()  # the killed run presented nothing as final
    assert sorted(losses(out)) == [1, 2, 3, 4]

    run_in_process(root / f"{stage}-killed.yaml", "resume_from_checkpoint=true")
    reference = root / stage
    assert max_diff(adapter(out), adapter(reference)) <= 1e-6
    resumed, expected = losses(out), losses(reference)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert {s: resumed[s] for s in range(5, STEPS + 1)} == {s: expected[s] for s in range(5, STEPS + 1)}
    assert len(set(expected.values())) > 1  # the weights moved: equal losses are not a constant


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_training_logs_carry_throughput(pair_runs, stage):
    root, _, _ = pair_runs
    entries = [json.loads(line) for line in (root / stage / "trainer_log.jsonl").read_text().splitlines()]
    trained = [e for e in entries if "loss" in e]
    assert len(trained) == STEPS
    for entry in trained:
        assert entry["tokens_per_second"] > 0 and 0 < entry["mfu"] < 1 and entry["peak_memory_gb"] > 0


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(pair_runs, tiny_model_dir, tmp_path, stage):
    from transformers import TrainerCallback

    from sftflow.train.callbacks import TrainingInterrupted

    class Sigterm(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # arrives while step 3 runs
                # refuse to signal this test process unless sftflow's handler would catch it
                handler = signal.getsignal(signal.SIGTERM)
                assert getattr(handler, "__name__", "") == "_handle", f"no SIGTERM handler: {handler}"
                os.kill(os.getpid(), signal.SIGTERM)

    root, data, _ = pair_runs
    out = tmp_path / "out"
    config = pair_config(tmp_path / "run.yaml", tiny_model_dir, data, out, stage)
    with pytest.raises(TrainingInterrupted) as info:
        run_in_process(config, callbacks=[Sigterm()])
    message = str(info.value)
    assert (
        f"training stopped by SIGTERM at step 3 of {STEPS}; checkpoint saved to {out / 'checkpoint-3'}"
        in message
    )
    assert "resume_from_checkpoint=true" in message
    assert is_complete(out / "checkpoint-3") and not (out / "adapter_model.safetensors").exists()

    run_in_process(config, "resume_from_checkpoint=true")
    assert max_diff(adapter(out), adapter(root / stage)) <= 1e-6


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_nan_loss_stops_naming_the_step(pair_runs, tiny_model_dir, tmp_path, stage):
    _, data, _ = pair_runs
    config = pair_config(
        tmp_path / "run.yaml", tiny_model_dir, data, tmp_path / "out", stage, max_steps=3, save_strategy="no"
    )
    with pytest.raises(SftflowError, match=r"training loss is nan at step 2 \(epoch .*\); training stopped"):
        run_in_process(config, callbacks=[Poison(2, 1).callback])
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_docstring_examples_hold():
    from sftflow.stages import dpo, rm
    from sftflow.train import checkpoints, trainer

    for module in (trainer, checkpoints, rm, dpo):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_the_private_methods_overridden_still_exist():
    """`Resilience` and the recipes override private methods of transformers' Trainer and of TRL; if an
    upgrade renames one, the override would be silently ignored (no atomic checkpoint, TRL re-tokenizing
    sftflow's ids). This names the method that moved."""
    from transformers import Trainer
    from trl import DPOTrainer, RewardTrainer

    from sftflow.stages.dpo import PretokenizedDPOTrainer
    from sftflow.stages.rm import ResilientRewardTrainer
    from sftflow.train.trainer import Resilience, SftflowTrainer

    def parameters(function) -> list[str]:
        return list(inspect.signature(function).parameters)

    assert parameters(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert parameters(Trainer._get_output_dir) == ["self", "trial"]
    assert parameters(Trainer._save_rng_state) == ["self", "output_dir"]  # test_faults.py's mid-save kill
    # Trainer._save_checkpoint writes where _get_output_dir says: the staging dir hangs on that
    assert "self._get_output_dir(" in inspect.getsource(Trainer._save_checkpoint)
    assert parameters(DPOTrainer._prepare_dataset) == [
        "self",
        "dataset",
        "processing_class",
        "args",
        "dataset_name",
    ]
    assert "self._prepare_dataset(" in inspect.getsource(DPOTrainer.__init__)
    try:
        from trl.experimental.orpo import ORPOTrainer
    except ImportError:
        pass
    else:
        assert parameters(ORPOTrainer.tokenize_row) == ["self", "feature", "model"]
    for trainer in (SftflowTrainer, ResilientRewardTrainer, PretokenizedDPOTrainer):
        mro = trainer.__mro__
        assert mro.index(Resilience) < mro.index(Trainer)
        assert trainer._save_checkpoint is Resilience._save_checkpoint
        assert trainer._get_output_dir is Resilience._get_output_dir
    assert issubclass(ResilientRewardTrainer, RewardTrainer) and issubclass(
        PretokenizedDPOTrainer, DPOTrainer
    )
