"""`sftflow plan`: its formulas against a tiny model's exact parameter, activation and FLOP counts."""

from __future__ import annotations

import copy

import pytest
import yaml

from sftflow.config import load_args
from sftflow.config.args import FinetuningArguments, ModelArguments
from sftflow.data.packing import packed_row_lengths
from sftflow.tools.plan.estimate import batches, padded_tokens
from sftflow.tools.plan.memory import activation_bytes, optimizer_bytes_per_param
from sftflow.train.perf import ModelShape, TrainSetup, flops_per_token

SETUPS = {
    "lora_all": {"finetuning_type": "lora", "lora_target": ["all"], "lora_rank": 4},
    "lora_qv": {"finetuning_type": "lora", "lora_target": ["q_proj", "v_proj"], "lora_rank": 8},
    "lora_mlp": {"finetuning_type": "lora", "lora_target": ["down_proj"], "lora_rank": 2},
    "full": {"finetuning_type": "full"},
    "freeze_last": {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
    "freeze_first": {"finetuning_type": "freeze", "freeze_trainable_layers": -1},
}


def tuned_model(model_dir, setup: dict, attn: str = "sdpa"):
    """The tiny model as `sftflow train` would tune it (fp32, lora_dropout 0)."""
    from transformers import AutoModelForCausalLM

    from sftflow.model.adapter import apply_finetuning

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", attn_implementation=attn)
    model_args = ModelArguments(model_name_or_path=str(model_dir))
    finetuning = FinetuningArguments(**setup)
    return apply_finetuning(model, model_args, finetuning), finetuning


def saved_bytes(model, batch: int, seq: int, loss=None) -> int:
    """Bytes of every distinct non-parameter tensor autograd saves in one forward pass with loss (the
    model's own, or `loss(ids)`)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(ids) if loss else model(input_ids=ids, labels=ids)
    return sum(storages.values())


@pytest.fixture(scope="module")
def shape(tiny_model_dir):
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(tiny_model_dir))


def test_parameter_count_matches_the_tiny_model(tiny_model_dir, shape):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, type(model.lm_head)))
    assert shape.matmul_params() == linears  # the 14 block linears plus the (tied) output head


def test_parameter_count_untied_with_biases():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert ModelShape.from_config(config).total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(SETUPS))
def test_trainable_parameters_match_apply_finetuning(tiny_model_dir, shape, name):
    model, finetuning = tuned_model(tiny_model_dir, SETUPS[name])
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert TrainSetup.from_args(shape, finetuning).trainable_params(shape) == expected


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize(("batch", "seq"), [(1, 9), (3, 17)])
def test_activation_bytes_equal_what_autograd_saves(tiny_model_dir, shape, name, batch, seq):
    model, finetuning = tuned_model(tiny_model_dir, SETUPS[name])
    setup = TrainSetup.from_args(shape, finetuning)
    assert activation_bytes(shape, setup, batch, seq).total == saved_bytes(model, batch, seq)


REWARD_SETUPS = {
    "lora_all": {**SETUPS["lora_all"], "additional_target": ["score"]},
    "full": SETUPS["full"],
    "freeze_last": {**SETUPS["freeze_last"], "freeze_extra_modules": ["score"]},
}


@pytest.mark.parametrize("name", list(REWARD_SETUPS))
@pytest.mark.parametrize(("pairs", "seq"), [(1, 9), (2, 17)])
def test_reward_model_activations_equal_what_autograd_saves(tiny_model_dir, name, pairs, seq):
    """rm: chosen and rejected in one batch through the score head, TRL's pairwise loss."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from sftflow.model.adapter import apply_finetuning

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype="float32")
    finetuning = FinetuningArguments(**copy.deepcopy(REWARD_SETUPS[name]))  # peft extends the lists
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    model = apply_finetuning(model, model_args, finetuning, task_type="SEQ_CLS")
    shape = ModelShape.from_model(model)
    setup = TrainSetup.from_args(shape, finetuning)

    def loss(ids):
        chosen, rejected = torch.chunk(model(input_ids=ids).logits.squeeze(-1), chunks=2)
        return -torch.nn.functional.logsigmoid(chosen - rejected).mean()

    assert activation_bytes(shape, setup, 2 * pairs, seq).total == saved_bytes(model, 2 * pairs, seq, loss)


def test_gradient_checkpointing_keeps_block_inputs_and_one_block(shape):
    setup = TrainSetup("lora", frozenset({"q_proj", "v_proj"}), 4)
    plain = activation_bytes(shape, setup, 2, 10)
    checkpointed = activation_bytes(shape, setup, 2, 10, gradient_checkpointing=True)
    # block 0 gets no gradient input (frozen embedding), so it keeps nothing; block 1 keeps its input
    assert checkpointed.layers == [0, 2 * 10 * shape.hidden * 4, max(plain.layers)]
    assert checkpointed.final == plain.final


def test_flops_per_token_match_torch_flop_counter(tiny_model_dir, shape):
    """Full tuning: 6N + attention exactly. LoRA: 4N is an upper bound that is tight for deep models
    (autograd skips input gradients of the first block's q/k/v/gate/up, whose input needs none).
    Eager attention, whose matmuls the counter sees (it does not count the CPU sdpa kernel)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch, seq = 2, 16
    for name, tolerance in (("full", 0.0), ("lora_all", 0.15)):
        model, finetuning = tuned_model(tiny_model_dir, SETUPS[name], attn="eager")
        ids = torch.randint(3, model.config.vocab_size, (batch, seq))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=ids).loss.backward()
        predicted = batch * seq * flops_per_token(shape, TrainSetup.from_args(shape, finetuning), seq, False)
        measured = counter.get_total_flops()
        assert measured <= predicted * (1 + 1e-9)
        assert predicted <= measured * (1 + tolerance) + 1e-9, (name, predicted, measured)


def test_batches_padding_and_packing():
    lengths = [5, 9, 3, 7, 2]
    assert sorted(sum(batches(lengths, 2, seed=0), [])) == sorted(lengths)
    assert padded_tokens([4, 4, 4, 4], 2, seed=1) == 16
    assert padded_tokens(lengths, 1, seed=0) == sum(lengths)
    assert packed_row_lengths([3, 4, 5, 2], 8) == [8, 6]  # best-fit decreasing, as training packs


def test_optimizer_state_bytes():
    assert optimizer_bytes_per_param("adamw_torch_fused") == 8
    assert optimizer_bytes_per_param("adamw_bnb_8bit") == 2
    assert optimizer_bytes_per_param("sgd") == 0


def test_plan_on_toy_data_audits_and_advises(tmp_path, tiny_model_dir, tiny_tokenizer, toy_data_dir, capsys):
    """The whole command on the tiny model: audit counts are exact and advice follows from them."""
    import json

    from sftflow.cli import main

    rows = json.loads((toy_data_dir / "train.json").read_text())
    rows.append(dict(rows[0]))  # one exact duplicate
    rows.append({**rows[1], "output": "A different answer. Wren"})  # same prompt, other answer
    (toy_data_dir / "train.json").write_text(json.dumps(rows))
    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(toy_data_dir),
        "dataset": "toy",
        "eval_dataset": "toy_heldout",
        "cutoff_len": 30,
        "output_dir": str(tmp_path / "out"),
        "do_train": True,
        "per_device_train_batch_size": 4,
        "num_train_epochs": 2,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out

    from sftflow.tools.plan import build_plan

    plan = build_plan(load_args(path))
    audit = plan.audit
    assert audit.per_dataset == {"toy": 20, "toy_heldout": 4}
    assert (audit.examples, audit.eval_examples, audit.get("duplicates"), audit.get("conflicting")) == (
        20,
        4,
        1,
        1,
    )
    assert audit.get("truncated") == sum(n > 30 for n in full_lengths(tiny_tokenizer, rows)) > 0
    assert audit.get("eot_untrained") == audit.get("truncated")  # truncation cut the end-of-turn token off
    assert plan.steps == 2 * 5
    assert plan.largest_seq == 30
    changes = " ".join(a.change for a in plan.advice)
    assert "cutoff_len:" in changes and "remove duplicate examples" in changes
    for section in (
        "stage sft",
        "Memory per device",
        "Time",
        "Data",
        "Advice",
        "predicted peak",
        "end-of-turn trained",
    ):
        assert section in out


def full_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Each alpaca row's tokenized length without cutoff_len."""
    from sftflow.data.converters import alpaca_to_messages
    from sftflow.data.encode import encode_sft
    from sftflow.data.registry import ALPACA_COLUMNS

    return [len(encode_sft(tokenizer, alpaca_to_messages(r, ALPACA_COLUMNS), 10**9).input_ids) for r in rows]


def test_plan_batches_the_rows_training_packs(tmp_path, tiny_model_dir, tiny_tokenizer, toy_data_dir):
    """With packing, plan's rows are the rows `pack_dataset` builds from the same data step."""
    from sftflow.data.packing import pack_dataset
    from sftflow.data.prepare import prepare
    from sftflow.tools.plan import build_plan

    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(toy_data_dir),
        "dataset": "toy",
        "cutoff_len": 128,
        "packing": True,
        "output_dir": str(tmp_path / "out"),
        "tokenized_cache_dir": str(tmp_path / "cache"),
        "do_train": True,
        "per_device_train_batch_size": 2,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    args = load_args(path)
    plan = build_plan(args)
    train = prepare("sft", args.data, tiny_tokenizer, args.training.seed, True).train
    packed = [len(ids) for ids in pack_dataset(train.shuffle(seed=3), 128)["input_ids"]]
    assert len(packed) < len(train)  # several examples share a row
    assert sorted(plan.rows) == sorted(packed)
    assert plan.steps == -(-len(packed) // 2) * args.training.num_train_epochs


def test_step_memory_per_stage(shape):
    """rm keeps no vocabulary-wide logits; dpo under full tuning holds a frozen reference copy, under
    LoRA none (the base with the adapter disabled); pairs run 2 x batch sequences."""
    from types import SimpleNamespace

    from sftflow.tools.plan.memory import logits_bytes, step_memory, weight_bytes

    training = SimpleNamespace(gradient_checkpointing=False, optim="adamw_torch")
    model_args = SimpleNamespace(attn_implementation="sdpa", quantization_bit=None)
    full = TrainSetup.from_args(shape, FinetuningArguments(finetuning_type="full"))
    lora = TrainSetup.from_args(shape, FinetuningArguments(**SETUPS["lora_all"]))

    def memory(stage, setup, reference, model_shape=shape):
        return step_memory(model_shape, setup, stage, 3, 20, 4, training, model_args, reference, 0, False)

    sft, dpo = memory("sft", lora, False), memory("dpo", lora, False)
    assert (
        sft.logits_extra == 2 * logits_bytes(3, 20, shape.vocab) and dpo.logits_extra == 2 * sft.logits_extra
    )
    assert dpo.activations == activation_bytes(shape, lora, 6, 20).total and dpo.reference == 0
    frozen_copy = weight_bytes(shape, TrainSetup("lora"), 4, None)
    assert memory("dpo", full, True).reference == frozen_copy == shape.total_params() * 4
    score = ModelShape(**{**vars(shape), "head": "score", "tied": False})
    rm = memory("rm", TrainSetup.from_args(score, FinetuningArguments(**SETUPS["lora_all"])), False, score)
    assert rm.logits_extra == 0 and rm.peak < dpo.peak


def test_plan_measure_on_a_pair_stage_says_how_to_time_it(tmp_path, tiny_model_dir, capsys):
    from pathlib import Path

    from sftflow.cli import main

    root = Path(__file__).resolve().parent.parent
    config = [str(root / "examples" / "rm_demo.yaml"), f"model_name_or_path={tiny_model_dir}"]
    config += [f"dataset_dir={root / 'data'}", f"tokenized_cache_dir={tmp_path / 'cache'}"]
    assert main(["plan", *config, "--measure"]) == 2
    err = capsys.readouterr().err
    assert "plan --measure times sft and pt steps" in err and "max_steps=4" in err and "Traceback" not in err


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_plan_measure_times_real_steps(stage, tmp_path, tiny_model_dir, toy_data_dir):
    from pathlib import Path

    from sftflow.tools.plan import build_plan

    root = Path(__file__).resolve().parent.parent
    keys = {"stage": "pt", "dataset": "wren_text", "dataset_dir": str(root / "data"), "cutoff_len": 32}
    if stage == "sft":
        keys = {"stage": "sft", "dataset": "toy", "dataset_dir": str(toy_data_dir), "cutoff_len": 64}
    config = {
        **keys,
        "model_name_or_path": str(tiny_model_dir),
        "output_dir": str(tmp_path / "out"),
        "tokenized_cache_dir": str(tmp_path / "cache"),
        "do_train": True,
        "per_device_train_batch_size": 2,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = build_plan(load_args(path), 1)
    assert plan.measured["step_seconds"] > 0 and plan.measured["peak_bytes"] > 0
    assert plan.measured["seq"] == plan.largest_seq  # the longest row, as the memory prediction
    assert plan.throughput_source == "measured over 1 steps"
    assert plan.flops_per_second == plan.measured["flops_per_second"] > 0


def test_plan_epoch_flops_are_what_the_logged_mfu_counts(
    tmp_path, tiny_model_dir, tiny_tokenizer, toy_data_dir
):
    """sft with fast_loss trains padding-free rows: plan's epoch FLOPs are the meter's FLOPs over the same
    examples; with fast_loss: false each batch is padded to its longest example."""
    from sftflow.tools.plan import build_plan
    from sftflow.train.perf import ThroughputMeter
    from sftflow.train.steps import build_model

    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(toy_data_dir),
        "dataset": "toy",
        "cutoff_len": 64,
        "output_dir": str(tmp_path / "out"),
        "tokenized_cache_dir": str(tmp_path / "cache"),
        "do_train": True,
        "per_device_train_batch_size": 4,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    args = load_args(path)
    plan = build_plan(args)
    meter = ThroughputMeter(build_model(args, tiny_tokenizer))
    assert plan.padding_free and plan.flops_per_epoch == pytest.approx(
        meter.flops(plan.audit.lengths), rel=1e-12
    )
    assert plan.computed_tokens_per_epoch == plan.audit.tokens

    padded = build_plan(load_args(path, ["fast_loss=false"]))
    assert not padded.padding_free
    assert (
        padded.computed_tokens_per_epoch
        == padded_tokens(padded.rows, 4, args.training.seed)
        >= plan.audit.tokens
    )


def test_dpo_full_that_does_not_fit_gets_one_batch_change_and_lora(tmp_path, tiny_model_dir, monkeypatch):
    """dpo under full tuning holds a reference copy; advice for a run that does not fit: the batch that
    fits (one batch change only), checkpointing, and LoRA, which also drops the reference copy."""
    from pathlib import Path

    import sftflow.tools.plan as plan_module
    from sftflow.tools.plan import build_plan

    root = Path(__file__).resolve().parent.parent
    keys = yaml.safe_load((root / "examples" / "dpo_demo.yaml").read_text())
    keys = {k: v for k, v in keys.items() if not k.startswith("lora_")}
    keys |= {"finetuning_type": "full", "model_name_or_path": str(tiny_model_dir)}
    keys |= {"dataset_dir": str(root / "data"), "tokenized_cache_dir": str(tmp_path / "cache")}
    keys |= {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 64}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(keys))
    roomy = build_plan(load_args(path))
    m = roomy.memory
    assert roomy.largest_batch == roomy.audit.examples < 64  # one batch holds every pair
    assert m.reference == roomy.shape.total_params() * 4 and roomy.reference == "model copy"
    per_row = (m.activations + m.logits_extra) / roomy.largest_batch
    small = int((m.peak - m.activations - m.logits_extra + 3.5 * per_row) / 0.9)
    device = plan_module.estimate.Device("small GPU", "cpu", small, small)
    monkeypatch.setattr(plan_module, "find_device", lambda: device)
    tight = build_plan(load_args(path))
    changes = [a.change for a in tight.advice]
    assert not tight.fits and sum(c.startswith("per_device_train_batch_size") for c in changes) == 1
    fitting = int(changes[0].removeprefix("per_device_train_batch_size:").split(",")[0])
    assert 1 <= fitting < roomy.largest_batch  # (the process RSS grew a little since the first plan)
    lora = next(a for a in tight.advice if a.change == "finetuning_type: lora")
    assert "the reference is the base with the adapter disabled" in lora.reason


def test_plan_on_a_grpo_config_is_one_clear_line(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    """plan does not model a grpo step: it says so instead of failing inside the data audit."""
    from sftflow.cli import main

    config = {
        "model_name_or_path": str(tiny_model_dir),
        "stage": "grpo",
        "reward_funcs": "length_target",
        "dataset_dir": str(toy_data_dir),
        "dataset": "toy",
        "output_dir": str(tmp_path / "out"),
        "do_train": True,
        "per_device_train_batch_size": 4,
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["plan", str(path)]) != 0
    err = capsys.readouterr().err
    assert "sftflow plan does not model a grpo step" in err and "Traceback" not in err
