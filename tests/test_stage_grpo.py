"""stage: grpo through TRL's GRPOTrainer on sftflow's prompts, rewards and Resilience: the data form, the
config checks, the built-in rewards and the errors of bad ones (fast), and, marked integration, advantages
and loss against hand-computed values on a fixed batch (grpo, dr_grpo, dapo), a step that moves the weights,
a toy reward that rises, and a reward that raises mid-run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sftflow.config import load_args
from sftflow.errors import SftflowError

PROMPTS = [
    {"instruction": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(1, 7) for b in range(1, 4)
]

LOW_HALF = """
def low_half(completions, completion_ids, **kwargs):
    # the share of completion tokens in the lower half of the tiny vocabulary (512 tokens)
    return [sum(i < 256 for i in ids) / max(1, len(ids)) for ids in completion_ids]

def by_length(completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

def raises_on_seven(completions, answer, **kwargs):
    return [1.0 / (int(a) - 7) for a in answer]

def one_short(completions, **kwargs):
    return [0.0] * (len(completions) - 1)

def text_value(completions, **kwargs):
    return ["high"] * len(completions)
"""


def grpo_data(tmp_path: Path) -> Path:
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "prompts.json"}}))
    (tmp_path / "toy_rewards.py").write_text(LOW_HALF)
    return tmp_path


def grpo_args(tmp_path: Path, model_dir: Path, **overrides):
    data = grpo_data(tmp_path)
    config = {
        "stage": "grpo",
        "model_name_or_path": model_dir,
        "dataset_dir": data,
        "dataset": "sums",
        "cutoff_len": 64,
        "output_dir": tmp_path / "out",
        "do_train": True,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "reward_funcs": f"{data / 'toy_rewards.py'}:low_half",
        "learning_rate": 3e-2,
        "finetuning_type": "full",
        "max_steps": 2,
        "logging_steps": 1,
        "plot_loss": True,
        "tokenized_cache_dir": tmp_path / "cache",
        **overrides,
    }
    return load_args(None, [f"{k}={v}" for k, v in config.items()])


# ---- config (fast) ----


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"per_device_train_batch_size": 6}, "multiple of num_generations"),
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"reward_funcs": "exact"}, "'exact' is not a built-in reward"),
        ({"reward_funcs": "nowhere.py:f"}, "file nowhere.py not found"),
        ({"reward_funcs": "answer_match", "reward_weights": "1,2"}, "reward_weights has 2 values for 1"),
        ({"reward_funcs": "regex_match"}, "regex_match needs reward_kwargs.regex"),
        (
            {"reward_funcs": "regex_match", "reward_kwargs": '{"regex": "("}'},
            "not a valid regular expression",
        ),
        ({"reward_funcs": "answer_match", "reward_kwargs": '{"target_words": 3}'}, "read by length_target"),
        ({"epsilon": 0.3, "epsilon_high": 0.2}, "epsilon_high .* must be >= epsilon"),
        ({"do_predict": True, "val_size": 2}, "stage: grpo does not predict"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"reward_funcs": "answer_match,answer_match"}, "lists a function twice"),
    ],
)
def test_grpo_config_is_checked_before_loading(tmp_path, tiny_model_dir, overrides, message):
    with pytest.raises(SftflowError, match=message):
        grpo_args(tmp_path, tiny_model_dir, **overrides)


def test_grpo_keys_are_refused_in_other_stages(tmp_path, tiny_model_dir):
    with pytest.raises(SftflowError, match="num_generations has no effect here: .*stage: grpo only"):
        grpo_args(tmp_path, tiny_model_dir, stage="sft", num_generations=8, reward_funcs="")


def test_grpo_config_maps_to_trl_names_and_sampling_defaults(tmp_path, tiny_model_dir):
    from sftflow.stages.grpo import grpo_config

    args = grpo_args(
        tmp_path,
        tiny_model_dir,
        beta=0.04,
        epsilon_high=0.28,
        loss_type="dr_grpo",
        scale_rewards="none",
        top_p=0.9,
    )
    config = grpo_config(args)
    assert (config.num_generations, config.max_completion_length, config.beta) == (4, 8, 0.04)
    assert (config.epsilon, config.epsilon_high, config.loss_type, config.scale_rewards) == (
        0.2,
        0.28,
        "dr_grpo",
        "none",
    )
    assert (
        config.top_p == 0.9 and config.temperature == 1.0
    )  # set by the user / TRL's default, not chat's 0.95
    assert config.learning_rate == 3e-2 and not config.remove_unused_columns


# ---- data form (fast) ----


def test_grpo_form_renders_prompts_and_passes_extra_columns(tmp_path, tiny_tokenizer):
    from sftflow.config.args import DataArguments
    from sftflow.data.prepare import prepare
    from sftflow.stages.grpo import grpo_rows

    rows = [
        {
            "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "level": 1,
        },
        {"messages": [{"role": "user", "content": "3+3?"}], "level": 2},
    ]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps(
            {"chat": {"file_name": "chat.json", "formatting": "openai", "columns": {"messages": "messages"}}}
        )
    )
    data = DataArguments(
        dataset=["chat"], dataset_dir=str(tmp_path), cutoff_len=64, tokenized_cache_dir=str(tmp_path / "c")
    )
    prepared = prepare("grpo", data, tiny_tokenizer, seed=0)
    trl_rows = grpo_rows(prepared.train)
    assert trl_rows[0]["prompt"].endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "4<|im_end|>" not in trl_rows[0]["prompt"]  # the final answer is taken off the prompt ...
    assert (trl_rows[0]["answer"], trl_rows[0]["level"]) == ("4", 1)  # ... and given to the rewards
    assert (trl_rows[1]["answer"], trl_rows[1]["level"]) == (None, 2)
    assert prepared.meta["splits"]["train"]["examples"] == 2


# ---- rewards (fast) ----


def test_builtin_rewards():
    from sftflow.train.rewards import builtin_rewards

    r = builtin_rewards({"regex": r"^\d+$", "target_words": 2, "max_words": 6}, 8, ("<think>", "</think>"))
    completions = [
        "<think>\nadd\n</think>\n\n4",
        "The answer is \\boxed{4.0}",
        "four",
        "one two three four five six seven",
    ]
    answers = ["4"] * 4
    assert r["answer_match"](completions, answer=answers) == [1.0, 0.0, 0.0, 0.0]
    assert r["normalized_match"](completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    assert r["regex_match"](completions) == [1.0, 0.0, 0.0, 0.0]
    assert r["think_format"](completions) == [1.0, 0.0, 0.0, 0.0]
    assert r["length_target"](completions) == [1.0, 0.5, 1.0, 0.0]
    assert r["overlong_penalty"](completions, completion_ids=[[1] * 4, [1] * 6, [1] * 7, [1] * 8]) == [
        0,
        0,
        -0.5,
        -1,
    ]
    with pytest.raises(SftflowError, match="reads column 'answer', which the data does not have"):
        r["answer_match"](completions, level=[1] * 4)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (
            "raises_on_seven",
            r"reward .*raises_on_seven raised ZeroDivisionError: .* on completion 2 of the batch \(prompt 'Q2'",
        ),
        ("one_short", "returned 3 values for 4 completions"),
        ("text_value", r"returned 'high' \(str\) for completion 0 of the batch"),
    ],
)
def test_a_bad_reward_gives_one_clear_error(tmp_path, function, message):
    from sftflow.train.rewards import load_rewards

    grpo_data(tmp_path)
    (reward,) = load_rewards([f"{tmp_path / 'toy_rewards.py'}:{function}"], None, 8, ("<think>", "</think>"))
    with pytest.raises(SftflowError, match=message):
        reward(
            prompts=["Q0", "Q1", "Q2", "Q3"], completions=["a", "b", "c", "d"], answer=["1", "2", "7", "3"]
        )


def test_reward_import_errors_name_the_function(tmp_path):
    from sftflow.train.rewards import import_reward

    grpo_data(tmp_path)
    with pytest.raises(SftflowError, match="has no function 'nope'"):
        import_reward(f"{tmp_path / 'toy_rewards.py'}:nope")
    with pytest.raises(SftflowError, match="importing no_such_module failed: ModuleNotFoundError"):
        import_reward("no_such_module:f")


# ---- the trainer on a fixed batch (integration: builds a trainer) ----


def fixed_trainer(tmp_path, model_dir, **overrides):
    from sftflow.data.prepare import prepare
    from sftflow.model.loader import load_chat_tokenizer
    from sftflow.stages.grpo import grpo_rows, grpo_trainer
    from sftflow.train.rewards import load_rewards
    from sftflow.train.steps import build_model

    args = grpo_args(
        tmp_path, model_dir, reward_funcs=f"{tmp_path / 'toy_rewards.py'}:by_length", **overrides
    )
    tokenizer = load_chat_tokenizer(args.model, args.data)
    rewards = load_rewards(args.finetuning.reward_funcs, None, 8, ("<think>", "</think>"))
    prompts = grpo_rows(prepare("grpo", args.data, tokenizer, 0).train)
    trainer = grpo_trainer(args, build_model(args, tokenizer), tokenizer, rewards, prompts, None, [])
    trainer.current_gradient_accumulation_steps = 1
    return trainer, prompts


GROUPS = [
    [[5], [5, 6], [5, 6, 7], [5, 6, 7, 8]],
    [[9, 9], [9, 9], [9, 9], [9, 9]],
]  # rewards 1..4, then 2,2,2,2


@pytest.mark.integration
@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_advantages_equal_hand_computed_values(tmp_path, tiny_model_dir, scale_rewards):
    trainer, prompts = fixed_trainer(tmp_path, tiny_model_dir, scale_rewards=scale_rewards)
    completions = [ids for group in GROUPS for ids in group]
    trainer._generate_single_turn = lambda *a, **k: ([list(c) for c in completions], None)
    inputs = [prompts[0]] * 4 + [prompts[1]] * 4
    trainer.model.train()  # metrics are kept per mode
    out = trainer._generate_and_score_completions(inputs)
    std = math.sqrt(sum((r - 2.5) ** 2 for r in (1, 2, 3, 4)) / 3)  # Bessel-corrected group std
    scale = (std + 1e-4) if scale_rewards == "group" else 1.0
    expected = [(r - 2.5) / scale for r in (1, 2, 3, 4)] + [0.0] * 4
    assert out["advantages"].tolist() == pytest.approx(expected, abs=1e-5)
    assert trainer._metrics["train"]["frac_reward_zero_std"] == [0.5]
    assert trainer._metrics["train"]["rewards/by_length/mean"] == [pytest.approx(2.25)]


@pytest.mark.integration
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_equals_the_hand_computed_clipped_objective(tmp_path, tiny_model_dir, loss_type):
    import torch

    trainer, _ = fixed_trainer(tmp_path, tiny_model_dir, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28)
    model = trainer.model
    prompt_ids = torch.tensor([[1, 5, 6], [1, 7, 8]])
    completion_ids = torch.tensor([[10, 11, 12, 2], [13, 14, 2, 2]])
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    advantages = torch.tensor([1.5, -0.5])
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.ones(2, 7, dtype=torch.long), 4
        )
    shift = torch.tensor([[0.5, -0.1, 0.0, 0.3], [-0.4, 0.05, 0.6, 0.0]])  # log(new / old) per token
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": logps - shift,
        "num_items_in_batch": completion_mask.sum(),
    }
    model.train()
    loss = trainer._compute_loss(model, inputs)

    ratio = shift.exp()
    clipped = ratio.clamp(1 - 0.2, 1 + 0.28)
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, clipped * a) * completion_mask
    if loss_type == "grpo":  # per completion, then over the batch
        expected = (per_token.sum(1) / completion_mask.sum(1)).mean()
    elif loss_type == "dr_grpo":  # over a fixed max_completion_length (8)
        expected = per_token.sum() / (2 * 8)
    else:  # dapo: over every completion token of the batch
        expected = per_token.sum() / completion_mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


# ---- whole runs (integration) ----


@pytest.mark.integration
def test_a_step_changes_the_parameters_and_writes_the_stage_outputs(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from sftflow.stages.registry import run_stage

    run_stage(grpo_args(tmp_path, tiny_model_dir, max_steps=1, finetuning_type="lora", learning_rate=1e-2))
    out = tmp_path / "out"
    for name in ["adapter_model.safetensors", "trainer_log.jsonl", "report.html", "data_stats.json"]:
        assert (out / name).is_file(), name
    weights = load_file(out / "adapter_model.safetensors")
    assert any(float(w.abs().max()) > 0 for name, w in weights.items() if "lora_B" in name)  # B starts at 0
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    step = next(e for e in logged if "loss" in e)
    for key in [
        "reward",
        "reward_std",
        "rewards/low_half/mean",
        "rewards/low_half/std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "tokens_per_second",
    ]:
        assert key in step, key
    assert torch.isfinite(torch.tensor(step["loss"]))


@pytest.mark.integration
def test_a_toy_reward_rises_over_30_steps(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    run_stage(grpo_args(tmp_path, tiny_model_dir, max_steps=30))
    out = tmp_path / "out"
    rewards = [
        json.loads(line)["reward"]
        for line in (out / "trainer_log.jsonl").read_text().splitlines()
        if '"reward"' in line
    ]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.2, (first, last)
    assert (out / "training_reward.png").is_file()
    assert (
        "mean reward" in (out / "report.html").read_text()
        and "training_reward.png" in (out / "report.html").read_text()
    )


@pytest.mark.integration
def test_a_reward_that_raises_mid_run_stops_it_naming_function_and_completion(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    args = grpo_args(
        tmp_path, tiny_model_dir, reward_funcs=f"{tmp_path / 'toy_rewards.py'}:raises_on_seven", max_steps=10
    )
    with pytest.raises(
        SftflowError,
        match=r"reward .*raises_on_seven raised ZeroDivisionError.* on completion \d+ of the batch",
    ):
        run_stage(args)


@pytest.mark.integration
def test_grpo_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    run_stage(grpo_args(tmp_path, tiny_model_dir, max_steps=4, save_steps=2))
    out = tmp_path / "out"
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    result = run_stage(
        grpo_args(
            tmp_path,
            tiny_model_dir,
            max_steps=6,
            save_steps=2,
            resume_from_checkpoint=str(out / "checkpoint-4"),
        )
    )
    steps = [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert steps.count(5) >= 1 and steps.count(3) == 1  # steps after the checkpoint appended once
    assert result.metrics["epoch"] > 0


@pytest.mark.integration
def test_grpo_evaluates_the_rewards_of_held_out_prompts(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    result = run_stage(
        grpo_args(tmp_path, tiny_model_dir, do_eval=True, val_size=4, per_device_eval_batch_size=4)
    )
    assert "eval_reward" in result.metrics and "eval_rewards/low_half/mean" in result.metrics
    assert (tmp_path / "out" / "eval_results.json").is_file()
