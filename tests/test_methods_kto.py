"""stage: kto on LLaMA-Factory's KTO data form (a kto_tag column) through TRL's KTOTrainer on sftflow's
tokenization: the data form, the loss against the KTO formula on the same batch, and a whole run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sftflow.config import load_args

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b if good else a + b + 1}."},
        ],
        "label": good,
    }
    for a in range(1, 5)
    for b in range(1, 4)
    for good in (True, False)
]


def kto_data(tmp_path: Path) -> Path:
    (tmp_path / "kto.json").write_text(json.dumps(ROWS))
    registry = {  # as in LLaMA-Factory's data/dataset_info.json (kto_en_demo)
        "kto_toy": {
            "file_name": "kto.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "kto_tag": "label"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    return tmp_path


def kto_args(tmp_path: Path, model_dir: Path, **overrides):
    config = {
        "stage": "kto",
        "model_name_or_path": model_dir,
        "dataset_dir": kto_data(tmp_path),
        "dataset": "kto_toy",
        "val_size": 4,
        "cutoff_len": 64,
        "lora_rank": 4,
        "output_dir": tmp_path / "out",
        "do_train": True,
        "do_eval": True,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 2,
        "learning_rate": 5e-3,
        "max_steps": 3,
        "logging_steps": 1,
        "report_to": "none",
        "plot_loss": False,
        "pref_beta": 0.5,
        "kto_rejected_weight": 1.5,
        "tokenized_cache_dir": tmp_path / "cache",
        **overrides,
    }
    return load_args(None, [f"{k}={v}" for k, v in config.items()])


def test_kto_form_keeps_the_tag_and_trains_only_the_last_answer(tmp_path, tiny_model_dir, tiny_tokenizer):
    from sftflow.data.prepare import prepare
    from sftflow.stages.kto import kto_completions

    args = kto_args(tmp_path, tiny_model_dir, val_size=0, do_eval=False)
    prepared = prepare("kto", args.data, tiny_tokenizer, seed=0)
    rows = kto_completions(prepared.train)
    assert sorted(rows.column_names) == ["completion_ids", "label", "prompt_ids"]
    assert rows["label"] == [row["label"] for row in ROWS]
    first = rows[0]
    assert tiny_tokenizer.decode(first["completion_ids"]) == "1 plus 1 is 2.<|im_end|>"
    assert tiny_tokenizer.decode(first["prompt_ids"]).endswith(
        "What is 1 plus 1?<|im_end|>\n<|im_start|>assistant\n"
    )


def completion_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return logps[len(prompt) - 1 :].gather(1, targets[len(prompt) - 1 :, None]).sum()


def test_kto_loss_matches_the_kto_formula_on_the_same_batch(tmp_path, tiny_model_dir):
    from sftflow.model.loader import load_chat_tokenizer
    from sftflow.stages.kto import kto_completions, kto_trainer
    from sftflow.train.steps import build_model, prepare_data

    args = kto_args(tmp_path, tiny_model_dir, val_size=0, do_eval=False)
    tokenizer = load_chat_tokenizer(args.model, args.data)
    (tmp_path / "out").mkdir()
    data = kto_completions(prepare_data(args, tokenizer).train)
    model = build_model(args, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    trainer = kto_trainer(args, model, tokenizer, data, None, [])
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()  # no dropout; the formula below runs the same weights
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        rows = [trainer.train_dataset[i] for i in range(4)]  # sequential sampler: the first batch
        with model.disable_adapter():
            ref = [completion_logps(model, r["prompt_ids"], r["completion_ids"]) for r in rows]
            ref_kl = [completion_logps(model, r["prompt_ids"], r["KL_completion_ids"]) for r in rows]
        pol = [completion_logps(model, r["prompt_ids"], r["completion_ids"]) for r in rows]
        pol_kl = [completion_logps(model, r["prompt_ids"], r["KL_completion_ids"]) for r in rows]
    beta = 0.5
    kl = max(sum(p - q for p, q in zip(pol_kl, ref_kl, strict=True)) / 4, 0)
    losses = [
        (1.0 * (1 - torch.sigmoid(beta * (p - q - kl))))
        if r["label"]
        else (1.5 * (1 - torch.sigmoid(beta * (kl - (p - q)))))
        for r, p, q in zip(rows, pol, ref, strict=True)
    ]
    assert any(r["label"] for r in rows) and not all(r["label"] for r in rows)
    assert kl > 0 or any(abs(p - q) > 1e-3 for p, q in zip(pol, ref, strict=True))
    torch.testing.assert_close(loss, torch.stack(losses).mean(), atol=1e-5, rtol=1e-4)
    # the KL pairs are the batch's own answers on their neighbours' prompts
    assert [r["KL_completion_ids"] for r in rows] == [
        rows[3]["completion_ids"],
        *[r["completion_ids"] for r in rows[:3]],
    ]


def test_kto_run_trains_evaluates_and_writes_the_stage_outputs(tmp_path, tiny_model_dir):
    from sftflow.stages.registry import run_stage

    result = run_stage(kto_args(tmp_path, tiny_model_dir))
    out = tmp_path / "out"
    for name in [
        "adapter_model.safetensors",
        "train_results.json",
        "eval_results.json",
        "trainer_log.jsonl",
        "report.html",
    ]:
        assert (out / name).is_file(), name
    assert "ref" not in json.loads((out / "adapter_config.json").read_text()).get(
        "base_model_name_or_path", ""
    )
    assert math.isfinite(result.metrics["eval_loss"]) and "eval_kl" in result.metrics
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("tokens_per_second" in str(entry) for entry in logged)  # Resilience's throughput log
