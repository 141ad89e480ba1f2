"""Faults for stage: grpo (TRL's GRPOTrainer with sftflow's `Resilience`), covered as sft is in
test_faults.py: kill -9 right after a checkpoint and an exact resume, and SIGTERM (a checkpoint, exit code 2,
the resume hint).

GRPO samples its completions, so an exact resume needs the checkpoint to restore the sampling RNG (the
Trainer's rng_state.pth: torch's global generator, which `generate` samples from) and the prompt order (TRL's
RepeatSampler, seeded, skipped forward by the Trainer). With one generation per optimizer step
(num_iterations 1, steps_per_generation = gradient_accumulation_steps = 1) no buffered completions cross a
checkpoint.

The killed and SIGTERMed runs are helpers.CHILD (subprocesses, started together); the reference and resumed
runs run in this process, single-threaded like the children.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from helpers import (
    adapter,
    finish,
    is_complete,
    losses,
    max_diff,
    run_in_process,
    start_child,
    train_config,
    write_config,
)

STEPS = 6

PROMPTS = [
    {"instruction": f"What is {a} plus {b}?", "output": str(a + b)} for a in range(1, 5) for b in range(1, 4)
]

# deterministic: a function of the sampled token ids only
REWARD = """
def low_half(completion_ids, **kwargs):
    return [sum(i < 256 for i in ids) / max(1, len(ids)) for ids in completion_ids]
"""


def grpo_config(path: Path, model_dir: Path, data_dir: Path, out: Path) -> Path:
    """A tiny grpo run: LoRA, 1 prompt x 4 completions of 8 tokens per step, STEPS steps, a checkpoint every 2."""
    values = {
        "stage": "grpo",
        "dataset": "sums",
        "lora_rank": 4,
        "reward_funcs": f"{data_dir / 'toy_reward.py'}:low_half",
        "num_generations": 4,
        "max_completion_length": 8,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": STEPS,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "plot_loss": False,
        "seed": 7,
        "preview_rows": 0,
        "tokenized_cache_dir": str(out.parent / f"cache-{out.name}"),  # concurrent runs share no entry
    }
    return write_config(path, train_config(model_dir, data_dir, out, **values))


def logged(out: Path, key: str) -> dict[int, float]:
    entries = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in entries if key in e and "loss" in e}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """An uninterrupted reference run, a run killed (SIGKILL) right after saving step 4 and one sent SIGTERM
    during step 3 (the children started together)."""
    root = tmp_path_factory.mktemp("faults-grpo")
    data = root / "data"
    data.mkdir()
    (data / "prompts.json").write_text(json.dumps(PROMPTS))
    (data / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "prompts.json"}}))
    (data / "toy_reward.py").write_text(REWARD)
    children = {}
    for mode, step in [("kill_after_save", 4), ("sigterm", 3)]:
        config = grpo_config(root / f"{mode}.yaml", tiny_model_dir, data, root / mode)
        children[mode] = start_child(root, config, mode, step)
    run_in_process(grpo_config(root / "reference.yaml", tiny_model_dir, data, root / "reference"))
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
    assert sorted(losses(out)) == [1, 2, 3, 4]

    run_in_process(root / "kill_after_save.yaml", "resume_from_checkpoint=true")
    reference = root / "reference"
    later = range(5, STEPS + 1)
    for key in ("loss", "reward", "completions/mean_length"):
        resumed, expected = logged(out, key), logged(reference, key)
        assert sorted(resumed) == list(range(1, STEPS + 1)), key
        assert {s: resumed[s] for s in later} == {s: expected[s] for s in later}, key
    assert max_diff(adapter(out), adapter(reference)) <= 1e-6
    assert len(set(logged(reference, "reward").values())) > 1  # sampled completions differ step to step


@pytest.mark.integration
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(runs):
    root, done = runs
    returncode, stdout, stderr = done["sigterm"]
    out = root / "sigterm"
    assert returncode == 2, stderr[-2000:]
    assert f"training stopped by SIGTERM at step 3 of {STEPS}; checkpoint saved to" in stderr
    assert "resume_from_checkpoint=true" in stderr and "Traceback" not in stderr
    assert "run finished" not in stdout and not (out / "adapter_model.safetensors").exists()
    assert is_complete(out / "checkpoint-3")

    run_in_process(root / "sigterm.yaml", "resume_from_checkpoint=true")
    assert max_diff(adapter(out), adapter(root / "reference")) <= 1e-6


def test_the_matmul_rate_measurement_leaves_the_global_rng_alone():
    """The MFU peak is measured at a run's first log, the first after a resume too: drawing its random
    matrices from the global generator made a resumed GRPO run sample differently from then on."""
    import torch

    from sftflow.train.perf import matmul_rates

    before = torch.get_rng_state()
    matmul_rates(size=(8, 8, 8), runs=1)
    assert torch.equal(torch.get_rng_state(), before)
