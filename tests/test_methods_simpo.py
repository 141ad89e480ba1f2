"""pref_loss: simpo through TRL's experimental CPOTrainer (loss_type simpo, cpo_alpha 0) on sftflow's ids: the
loss equals SimPO's formula on the same batch, and the trainer trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import as_overrides, train_config
from sftflow.config import load_args

PAIRS = [
    {"prompt_ids": [1, 10 + i, 11 + i, 2], "chosen_ids": [20 + i, 21, 2], "rejected_ids": [30 + i, 2]}
    for i in range(4)
]


def simpo_setup(tmp_path, model_dir, **overrides):
    from datasets import Dataset

    from sftflow.model.loader import load_chat_tokenizer
    from sftflow.train.preference import simpo_trainer
    from sftflow.train.steps import build_model

    config = {
        "stage": "dpo",
        "pref_loss": "simpo",
        "pref_beta": 2.0,
        "simpo_gamma": 0.8,
        "dataset": "unused",
        "do_train": None,
        "lora_rank": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": 2,
        "report_to": "none",
        **overrides,
    }
    args = load_args(None, as_overrides(train_config(model_dir, None, tmp_path / "out", **config)))
    tokenizer = load_chat_tokenizer(args.model, args.data)
    model = build_model(args, tokenizer)
    trainer = simpo_trainer(args, model, tokenizer, Dataset.from_list(PAIRS), None, [])
    return trainer, model


def mean_logp(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + answer])
    logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    return logps[len(prompt) - 1 :].gather(1, ids[0, len(prompt) :, None]).mean()


def test_simpo_loss_is_the_simpo_formula(tmp_path, tiny_model_dir):
    trainer, model = simpo_setup(tmp_path, tiny_model_dir)
    assert trainer.loss_type == "simpo" and trainer.cpo_alpha == 0 and trainer.simpo_gamma == 0.8
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["chosen_labels"].shape[0] == len(PAIRS)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        rows = PAIRS  # the batch holds all four pairs
        chosen = torch.stack([mean_logp(model, r["prompt_ids"], r["chosen_ids"]) for r in rows])
        rejected = torch.stack([mean_logp(model, r["prompt_ids"], r["rejected_ids"]) for r in rows])
    expected = -F.logsigmoid(2.0 * (chosen - rejected) - 0.8).mean()  # the loss is a mean: order-free
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)


def test_simpo_trains_with_resilience(tmp_path, tiny_model_dir):
    trainer, model = simpo_setup(tmp_path, tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    output = trainer.train()
    assert output.global_step == 2 and trainer.throughput is not None  # Resilience's meter is in the loop
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
