"""Packing: bins, packed rows, and the proof that a packed batch gives each example its unpacked loss."""

from __future__ import annotations

import pytest

from sftflow.data.collator import PackedCollator
from sftflow.data.encode import IGNORE_INDEX, encode_sft
from sftflow.data.packing import pack_dataset, pack_lengths, pack_rows

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I am Wren."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好 🙂"},
        {"role": "assistant", "content": "你好，世界。"},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
    ],
    [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [
        {"role": "user", "content": "The quick brown fox"},
        {"role": "assistant", "content": "jumps over the lazy dog."},
    ],
]


def test_pack_lengths_best_fit_decreasing():
    assert pack_lengths([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    lengths = [7, 1, 6, 2, 5, 3, 4, 4, 8]
    bins = pack_lengths(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins) and len(bins) == 5  # 40 tokens: 5 full bins
    with pytest.raises(ValueError, match="longer than the packing capacity"):
        pack_lengths([9], 8)


def test_pack_rows_restarts_positions_and_masks_each_first_label():
    row = pack_rows(
        [{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8, 9], "labels": [-100, 8, 9]}]
    )
    assert row == {
        "input_ids": [5, 6, 7, 8, 9],
        "labels": [-100, 6, -100, 8, 9],
        "position_ids": [0, 1, 0, 1, 2],
    }


def per_token_losses(logits, labels):
    """Cross-entropy of each trained next-token prediction, in order (the model's own shift)."""
    import torch

    shift_logits, shift_labels = logits[:-1], labels[1:]
    keep = shift_labels != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="none")


def test_packed_batch_gives_each_example_its_unpacked_loss(tiny_model_dir, tiny_tokenizer):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False  # as the workflow sets for packing
    examples = [encode_sft(tiny_tokenizer, c, cutoff_len=128) for c in CONVERSATIONS]
    dataset = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
    packed = pack_dataset(dataset, cutoff_len=128)
    assert len(packed) < len(examples) and max(len(r) for r in packed["input_ids"]) <= 128
    assert any(row.count(0) >= 2 for row in packed["position_ids"])  # rows hold several examples

    with torch.no_grad():
        unpacked = [
            per_token_losses(model(torch.tensor([e.input_ids])).logits[0], torch.tensor(e.labels))
            for e in examples
        ]
        batch = PackedCollator(tiny_tokenizer.pad_token_id)([packed[i] for i in range(len(packed))])
        assert "attention_mask" not in batch
        output = model(**batch)
        # without the per-example positions, examples would attend to each other: a different loss
        plain = model(input_ids=batch["input_ids"]).logits

    matched = 0
    for r in range(len(packed)):
        starts = [i for i, p in enumerate(packed[r]["position_ids"]) if p == 0] + [
            len(packed[r]["input_ids"])
        ]
        for a, b in zip(starts, starts[1:], strict=False):
            ids = packed[r]["input_ids"][a:b]
            k = next(i for i, e in enumerate(examples) if e.input_ids == ids)
            losses = per_token_losses(output.logits[r, a:b], torch.tensor(examples[k].labels))
            torch.testing.assert_close(losses, unpacked[k], atol=1e-5, rtol=1e-5)
            if a > 0:
                assert not torch.allclose(
                    per_token_losses(plain[r, a:b], torch.tensor(examples[k].labels)), unpacked[k], atol=1e-3
                )
            matched += 1
    assert matched == len(examples)
    # the batch loss is the token-weighted mean of the unpacked per-token losses
    torch.testing.assert_close(output.loss, torch.cat(unpacked).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_packing_runs_through_the_workflow(tmp_path, tiny_model_dir, toy_data_dir):
    from sftflow.config import load_args
    from sftflow.stages.sft import run_sft
    from test_sft_e2e import write_config

    config = write_config(tmp_path, tiny_model_dir, toy_data_dir, packing=True, do_predict=False, max_steps=2)
    result = run_sft(load_args(config))
    assert 0 < result.metrics["train_loss"] < 20 and 0 < result.metrics["eval_loss"] < 20
