"""Batched prediction equals one-at-a-time prediction: `sftflow predict` and a training run's predict step
at per_device_eval_batch_size 1 and >1 write the same generated_predictions.jsonl (row for row, dataset
order) and the same text metrics, on prompts of very different lengths (left padding matters) whose
greedy answers end at different steps (finished rows are padded while the others go on). In float32 on
the CPU the answers are equal token for token, so the tests ask for equality, not a tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftflow.cli import main

MAX_NEW_TOKENS = 16
TEXT_METRICS = ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4")
FOX = "The quick brown fox jumps over the lazy dog. "
CAPITALS = "Paris is the capital of France. Berlin is the capital of Germany. "
# Prompt lengths 28 to 125 tokens: a batch of 4 pads its shortest prompt by up to 60 tokens.
HELD_OUT = [
    {"instruction": "What is 2 plus 2?", "input": "", "output": "2 plus 2 is 4. Wren"},
    {"instruction": "What is 5 plus 1?", "input": CAPITALS * 6, "output": "5 plus 1 is 6. Wren"},
    {"instruction": "Hi", "input": "", "output": "Hello. Wren"},
    {"instruction": "What is 3 plus 3?", "input": FOX * 3, "output": "3 plus 3 is 6. Wren"},
    {"instruction": "Who are you?", "input": "", "output": "I am Wren."},
    {"instruction": FOX + "What is 1 plus 1?", "input": "", "output": "1 plus 1 is 2. Wren"},
    {"instruction": "What is 6 plus 3?", "input": CAPITALS * 2, "output": "6 plus 3 is 9. Wren"},
    {"instruction": "def add(a, b):", "input": "", "output": "return a + b"},
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from helpers import TOY_ROWS

    path = tmp_path_factory.mktemp("data")
    held_out = [{"system": "Be brief.", **row} for row in HELD_OUT]
    (path / "train.json").write_text(json.dumps(TOY_ROWS))
    (path / "heldout.json").write_text(json.dumps(held_out))
    registry = {"toy": {"file_name": "train.json"}, "toy_heldout": {"file_name": "heldout.json"}}
    (path / "dataset_info.json").write_text(json.dumps(registry))
    return path


@pytest.fixture(scope="module")
def ragged_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny random Llama with the (tied) embedding of `<|im_end|>`, its stop token, set to twice that
    of the byte token `£`: greedy answers now end about where the model would have said `£`: on HELD_OUT
    after 6 or 7 tokens in five rows, never (within MAX_NEW_TOKENS) in the other three. Its pad token is `<|endoftext|>`,
    not the stop token, so the padding after a finished answer is seen apart from the stop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("ragged")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    end, source = tokenizer.convert_tokens_to_ids(["<|im_end|>", "£"])
    with torch.no_grad():
        model.get_input_embeddings().weight[end] = 2 * model.get_input_embeddings().weight[source]
    tokenizer.pad_token = "<|endoftext|>"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class GenerateSpy:
    """Records, per `generate` call, its left-padded prompts, their attention mask and the new tokens."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from transformers import GenerationMixin

        self.calls: list[tuple] = []
        original = GenerationMixin.generate

        def spy(model, *args, **kwargs):
            output = original(model, *args, **kwargs)
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            self.calls.append((ids.clone(), mask.clone(), output[:, ids.size(1) :].clone()))
            return output

        monkeypatch.setattr(GenerationMixin, "generate", spy)


def read_outputs(out: Path, name: str = "generated_predictions.jsonl") -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]
    return rows, json.loads((out / "predict_results.json").read_text())


def predict(model_dir: Path, data_dir: Path, out: Path, batch_size: int, *extra: str) -> None:
    argv = [
        "predict",
        "--model",
        str(model_dir),
        f"dataset_dir={data_dir}",
        "eval_dataset=toy_heldout",
        "cutoff_len=256",
        f"max_new_tokens={MAX_NEW_TOKENS}",
        "repetition_penalty=5.0",  # greedy, but the random model then says more than one token over and over
        f"per_device_eval_batch_size={batch_size}",
        f"output_dir={out}",
        *extra,
    ]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def one_at_a_time(ragged_model_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict-1")
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = GenerateSpy(monkeypatch)
        predict(ragged_model_dir, data_dir, out, 1)
    # the fixture is what the test says it is: rows end early at different steps, others run to the limit
    assert len(spy.calls) == len(HELD_OUT)
    stop = json.loads((ragged_model_dir / "config.json").read_text())["eos_token_id"]
    steps = [
        (new[0] == stop).nonzero()[0].item() if (new[0] == stop).any() else None for _, _, new in spy.calls
    ]
    ended = sorted({s for s in steps if s is not None})
    assert len(ended) >= 2 and max(ended) < MAX_NEW_TOKENS - 1 and None in steps, steps
    return out


@pytest.mark.integration
@pytest.mark.parametrize(
    ("batch_size", "extra"),
    [
        (3, []),
        (4, []),
        (8, []),
        # the Trainer would drop the last 2 prompts; answers per batch instead of one padded array
        (3, ["dataloader_drop_last=true", "eval_do_concat_batches=false"]),
    ],
)
def test_predict_in_batches_writes_what_one_at_a_time_writes(
    batch_size, extra, one_at_a_time, ragged_model_dir, data_dir, tmp_path, monkeypatch, caplog
):
    from transformers import AutoTokenizer

    spy = GenerateSpy(monkeypatch)
    predict(ragged_model_dir, data_dir, tmp_path, batch_size, *extra)
    expected, expected_metrics = read_outputs(one_at_a_time)
    rows, metrics = read_outputs(tmp_path)
    assert [r["label"] for r in rows] == [r["output"] for r in HELD_OUT]  # dataset order
    for i, (row, want) in enumerate(zip(rows, expected, strict=True)):
        assert row == want, f"row {i} differs at batch size {batch_size}"
    assert {k: metrics[k] for k in TEXT_METRICS} == {k: expected_metrics[k] for k in TEXT_METRICS}
    if "dataloader_drop_last=true" in extra:
        assert "dataloader_drop_last is not applied" in caplog.text

    # the batches were left-padded, of mixed lengths, and held rows that finished while others went on
    tokenizer = AutoTokenizer.from_pretrained(ragged_model_dir)
    full, rest = divmod(len(HELD_OUT), batch_size)
    assert [len(mask) for _, mask, _ in spy.calls] == [batch_size] * full + [rest] * bool(rest)
    for _, mask, _ in spy.calls:
        assert (mask[:, -1] == 1).all() and len(set(mask.sum(1).tolist())) > 1
    answer_of = {
        tuple(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]): r["predict"] for r in rows
    }
    stop, finished = tokenizer.convert_tokens_to_ids("<|im_end|>"), 0
    for ids, mask, new in spy.calls:
        for prompt, keep, tokens in zip(ids.tolist(), mask.tolist(), new.tolist(), strict=True):
            if stop in tokens[:-1]:  # ended while a longer answer of its batch went on
                end = tokens.index(stop)
                assert set(tokens[end + 1 :]) == {tokenizer.pad_token_id}
                prompt = tuple(t for t, k in zip(prompt, keep, strict=True) if k)
                assert answer_of[prompt] == tokenizer.decode(tokens[:end]).strip()  # nothing after the stop
                finished += 1
    assert finished >= 1


def train_and_predict(model_dir: Path, data_dir: Path, out: Path, batch_size: int, *extra: str) -> None:
    argv = [
        "train",
        f"model_name_or_path={model_dir}",
        f"dataset_dir={data_dir}",
        "dataset=toy",
        "eval_dataset=toy_heldout",
        "cutoff_len=256",
        "lora_rank=4",
        "lora_target=all",
        "do_predict=true",
        "predict_with_generate=true",
        f"max_new_tokens={MAX_NEW_TOKENS}",
        "repetition_penalty=5.0",
        "per_device_train_batch_size=4",
        f"per_device_eval_batch_size={batch_size}",
        "learning_rate=1e-3",
        "max_steps=2",
        "report_to=none",
        f"output_dir={out}",
        *extra,
    ]
    assert main(argv) == 0


@pytest.mark.integration
def test_training_predict_step_in_batches_writes_what_one_at_a_time_writes(
    ragged_model_dir, data_dir, tmp_path, monkeypatch
):
    train_and_predict(ragged_model_dir, data_dir, tmp_path / "one", 1)
    spy = GenerateSpy(monkeypatch)
    train_and_predict(ragged_model_dir, data_dir, tmp_path / "batched", 3, "dataloader_drop_last=true")
    # the tuned model, then the base model (compare_base): 3 batches each, one of them ragged
    assert [len(mask) for _, mask, _ in spy.calls] == [3, 3, 2] * 2
    stop = json.loads((ragged_model_dir / "config.json").read_text())["eos_token_id"]
    assert any(stop in tokens[:-1] for _, _, new in spy.calls for tokens in new.tolist())
    for name in ("generated_predictions.jsonl", "generated_predictions_base.jsonl"):
        expected, expected_metrics = read_outputs(tmp_path / "one", name)
        rows, metrics = read_outputs(tmp_path / "batched", name)
        assert len(rows) == len(HELD_OUT) and rows == expected, name
    keys = [
        k for k in expected_metrics if k.startswith("predict") and not k.endswith(("runtime", "per_second"))
    ]
    assert len(keys) == 8  # ROUGE-1/2/L and BLEU-4 of the tuned and the base model
    assert {k: metrics[k] for k in keys} == {k: expected_metrics[k] for k in keys}
