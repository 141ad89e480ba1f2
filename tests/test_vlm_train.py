"""Training models that see: sft train -> eval -> predict on a tiny LLaVA and a tiny Qwen2-VL, the saved
adapter reloaded to generate the same answers, the freeze_* flags, and the settings refused for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sftflow.config import load_args
from sftflow.errors import SftflowError
from vlm_models import build_llava, build_qwen2_5_vl, build_qwen2_vl, image_data_dir, image_rows


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return build_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_qwen2_vl(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory) -> Path:
    return build_qwen2_5_vl(tmp_path_factory.mktemp("qwen25vl"))


def _config(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    words = [{"instruction": "Say hi", "output": "Hi."}, {"instruction": "Say bye", "output": "Bye."}]
    data_dir = image_data_dir(tmp_path / "data", image_rows(6), words)
    config = {
        "model_name_or_path": str(model_dir),
        "dataset_dir": str(data_dir),
        "dataset": "pics,words",
        "eval_dataset": "pics",
        "max_samples": 3,
        "cutoff_len": 128,
        "lora_rank": 4,
        "output_dir": str(tmp_path / "out"),
        "do_train": True,
        "do_eval": True,
        "do_predict": True,
        "predict_with_generate": True,
        "max_new_tokens": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 2,
        "learning_rate": 5e-3,
        "max_steps": 2,
        "logging_steps": 1,
        "tokenized_cache_dir": str(tmp_path / "cache"),
        "report_to": "none",
        **overrides,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return path


def _generate(model, files: Path, data_dir: Path) -> str:
    """Generate for the first held-out row with `model`, its tokenizer and image processor read from
    `files` (a run's output dir or an export dir), as a user would."""
    from transformers import AutoTokenizer

    from sftflow.data.encode import encode_prompt
    from sftflow.data.vision import VisionCollator, load_vision

    tokenizer = AutoTokenizer.from_pretrained(files)
    vision = load_vision(
        model.config.name_or_path if not (files / "config.json").is_file() else files, tokenizer
    )
    vision.processor = type(vision.processor).from_pretrained(files)  # the image processor saved there
    row = image_rows(1)[0]
    ref = str((data_dir / row["images"][0]).resolve())
    counts = vision.token_counts(vision.pixels([vision.load(ref)]))
    ids = encode_prompt(tokenizer, vision.expand(row["messages"], counts), 128)
    batch = VisionCollator(tokenizer.pad_token_id, vision, padding_side="left")(
        [{"input_ids": ids, "images": [ref]}]
    )
    tokens = model.eval().generate(**batch, max_new_tokens=4, do_sample=False)[:, len(ids) :]
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)[0].strip()


DIRS = {"llava": "llava_dir", "qwen2_vl": "qwen_dir", "qwen2_5_vl": "qwen25_dir"}


@pytest.mark.integration
@pytest.mark.parametrize("family", list(DIRS))
def test_train_eval_predict_then_reload_the_adapter(tmp_path, family, request):
    from sftflow.stages.sft import run_sft

    model_dir = request.getfixturevalue(DIRS[family])
    result = run_sft(load_args(_config(tmp_path, model_dir)))
    out = result.output_dir
    assert {"adapter_model.safetensors", "preprocessor_config.json", "generated_predictions.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    assert result.metrics["eval_loss"] > 0 and result.metrics["train_loss"] > 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert all(".language_model." in name for name in adapter["target_modules"])
    predictions = [
        json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 3 and all("<image>What colour" in p["prompt"] for p in predictions)
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["splits"]["train"]["examples"] == 5  # 3 image rows + 2 text rows
    red = next(p for p in predictions if p["label"] == "It is red.")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from sftflow.config.args import ModelArguments
    from sftflow.model.export import export_model

    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), out)
    assert _generate(tuned, out, tmp_path / "data") == red["predict"]  # the reloaded adapter answers alike
    merged_dir = export_model(
        ModelArguments(str(model_dir), adapter_name_or_path=str(out), export_dir=str(tmp_path / "merged"))
    )
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert _generate(merged, merged_dir, tmp_path / "data") == red["predict"]  # and so does the merged dir
    from sftflow.cli import main

    assert main(["predict", str(out)]) == 0  # sftflow predict RUN_DIR: the same answers, from the merged run
    again = [
        json.loads(line)
        for line in (out / "predict" / "generated_predictions.jsonl").read_text().splitlines()
    ]
    assert [p["predict"] for p in again] == [p["predict"] for p in predictions]
    with pytest.raises(SftflowError, match="export_format: gguf is not supported for a model that sees"):
        export_model(
            ModelArguments(
                str(model_dir),
                adapter_name_or_path=str(out),
                export_dir=str(tmp_path / "g"),
                export_format="gguf",
            )
        )


def _apply(model_dir: Path, **finetuning):
    from transformers import AutoModelForImageTextToText

    from sftflow.config.args import FinetuningArguments, ModelArguments
    from sftflow.model.adapter import apply_finetuning

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    return apply_finetuning(model, ModelArguments(str(model_dir)), FinetuningArguments(**finetuning))


def _trained(model) -> set[str]:
    parts = (
        "vision_tower",
        "visual.blocks",
        "visual.merger",
        "multi_modal_projector",
        "language_model",
        "lm_head",
    )
    return {part for name, p in model.named_parameters() if p.requires_grad for part in parts if part in name}


@pytest.mark.parametrize("family", list(DIRS))
def test_freeze_flags_choose_the_trained_parts(family, request):
    model_dir = request.getfixturevalue(DIRS[family])
    tower, projector = (
        ("vision_tower", "multi_modal_projector") if family == "llava" else ("visual.blocks", "visual.merger")
    )
    assert _trained(_apply(model_dir)) == {"language_model"}  # LoRA: the language model only
    assert _trained(_apply(model_dir, freeze_vision_tower=False)) == {"language_model", tower}
    assert _trained(_apply(model_dir, freeze_language_model=True, freeze_multi_modal_projector=False)) == {
        projector
    }
    assert _trained(_apply(model_dir, finetuning_type="full")) == {"language_model", "lm_head"}
    full = _apply(model_dir, finetuning_type="full", freeze_vision_tower=False, freeze_language_model=True)
    assert _trained(full) == {tower}
    with pytest.raises(SftflowError, match="matches no linear layer outside the frozen parts"):
        _apply(model_dir, freeze_language_model=True)
    with pytest.raises(SftflowError, match="freeze_\\* flags freeze every part"):
        _apply(model_dir, finetuning_type="full", freeze_language_model=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"packing": True}, "packing: true is not supported for image models .llava.: packed rows"),
        (
            {"finetuning_type": "freeze", "lora_rank": None},
            "finetuning_type: freeze is not supported for image",
        ),
        ({"use_dft_loss": True}, "use_dft_loss: true is not supported for image models"),
    ],
)
def test_settings_image_batches_cannot_take_are_refused(tmp_path, llava_dir, overrides, message):
    from sftflow.stages.sft import run_sft

    with pytest.raises(SftflowError, match=message):
        run_sft(load_args(_config(tmp_path, llava_dir, **overrides)))


def test_image_keys_on_a_text_model_are_refused(tmp_path, tiny_model_dir):
    from sftflow.stages.sft import run_sft

    config = _config(tmp_path, tiny_model_dir, image_max_pixels=1000, freeze_vision_tower=False)
    with pytest.raises(
        SftflowError, match="image_max_pixels, freeze_vision_tower apply to models that see; .* is text"
    ):
        run_sft(load_args(config))


def test_other_stages_refuse_a_model_that_sees(llava_dir):
    from sftflow.config.args import ModelArguments
    from sftflow.model.loader import load_model

    with pytest.raises(SftflowError, match="is a model that sees .*stage: sft"):
        load_model(ModelArguments(str(llava_dir)))


@pytest.mark.parametrize("key", ["image_max_pixels", "freeze_vision_tower"])
def test_image_keys_outside_sft_are_refused(key):
    from sftflow.config.parser import args_from_dict

    value = {"image_max_pixels": 4096, "freeze_vision_tower": False}[key]
    base = {"model_name_or_path": "some/model", "output_dir": "/tmp/sftflow-vlm-out", "stage": "dpo"}
    with pytest.raises(SftflowError, match=f"{key} has no effect here: .*applies to stage: sft only"):
        args_from_dict({**base, key: value})
