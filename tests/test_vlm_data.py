"""Image rows: LLaMA-Factory's form and OpenAI content parts, exact ids/labels/pixels for LLaVA and Qwen2-VL
against their own processors, one-line row errors, mixed text/image batches, the cutoff and the cache."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sftflow.config.args import DataArguments
from sftflow.data.encode import IGNORE_INDEX
from sftflow.data.loader import load_conversations
from sftflow.data.prepare import prepare
from sftflow.data.vision import VisionCollator, load_vision
from sftflow.errors import SftflowError
from vlm_models import MLLM_ENTRY, build_llava, build_qwen2_vl, image_data_dir, image_rows, write_png


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return build_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_qwen2_vl(tmp_path_factory.mktemp("qwen2vl"))


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _data(data_dir: Path, tmp_path: Path, names: str = "pics", **kw) -> DataArguments:
    return DataArguments(
        dataset=names.split(","),
        dataset_dir=str(data_dir),
        cutoff_len=kw.pop("cutoff_len", 256),
        tokenized_cache_dir=str(tmp_path / "cache"),
        **kw,
    )


def _prepared(model_dir: Path, data: DataArguments):
    tokenizer = _tokenizer(model_dir)
    vision = load_vision(model_dir, tokenizer)
    return tokenizer, vision, prepare("sft", data, tokenizer, seed=0, vision=vision)


# ---- golden: ids, labels and pixels against the models' own processors ----


def test_llava_ids_and_pixels_match_llava_processor(tmp_path, llava_dir):
    from PIL import Image
    from transformers import AutoProcessor

    data_dir = image_data_dir(tmp_path / "d")
    tokenizer, vision, prepared = _prepared(llava_dir, _data(data_dir, tmp_path))
    row = prepared.train[0]
    messages = [
        {"role": "user", "content": "<image>What colour is this square?"},
        {"role": "assistant", "content": "It is red."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    processor = AutoProcessor.from_pretrained(llava_dir)
    image = Image.open(data_dir / "images" / "red.png")
    expected = processor(text=text, images=[image], return_tensors="pt")
    assert row["input_ids"] == expected["input_ids"][0].tolist()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert row["input_ids"].count(image_id) == 4  # (28 // 14) ** 2 patches + the CLS token - 1 (default)
    answer = tokenizer.encode("It is red.<|im_end|>", add_special_tokens=False)
    assert [t for t in row["labels"] if t != IGNORE_INDEX] == answer
    batch = VisionCollator(tokenizer.pad_token_id, vision)([row])
    assert tuple(batch["pixel_values"].shape) == tuple(expected["pixel_values"].shape) == (1, 3, 28, 28)
    assert batch["pixel_values"].allclose(expected["pixel_values"])


def test_qwen2_vl_ids_grid_and_pixels_match_its_image_processor(tmp_path, qwen_dir):
    from PIL import Image
    from transformers import AutoImageProcessor

    rows = image_rows(1)
    rows[0]["images"] = ["images/wide.png"]
    data_dir = image_data_dir(tmp_path / "d", rows)
    write_png(data_dir / "images" / "wide.png", "blue", size=(100, 40))
    tokenizer, vision, prepared = _prepared(qwen_dir, _data(data_dir, tmp_path))
    row = prepared.train[0]
    processed = AutoImageProcessor.from_pretrained(qwen_dir)(
        images=[Image.open(data_dir / "images" / "wide.png")], return_tensors="pt"
    )
    grid = processed["image_grid_thw"][0].tolist()
    assert grid == [1, 2, 8]  # 100x40 -> 112x28 within max_pixels 56*56: 2 x 8 patches of 14
    # Qwen2VLProcessor cannot be built without torchvision (its video processor); its own expansion rule,
    # run on the image processor's output, gives the image's run
    from types import SimpleNamespace

    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    stand_in = SimpleNamespace(image_processor=vision.processor, image_token="<|image_pad|>")
    pads = Qwen2VLProcessor.replace_image_token(stand_in, processed, 0)
    assert pads == "<|image_pad|>" * (2 * 8 // 4)
    run = "<|vision_start|>" + pads + "<|vision_end|>"
    messages = [
        {"role": "user", "content": run + "What colour is this square?"},
        {"role": "assistant", "content": "It is red."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == tokenizer.encode(text, add_special_tokens=False)
    batch = VisionCollator(tokenizer.pad_token_id, vision)([row])
    assert batch["image_grid_thw"].tolist() == [grid]
    assert tuple(batch["pixel_values"].shape) == (16, 1176)
    assert batch["pixel_values"].allclose(processed["pixel_values"])
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert batch["mm_token_type_ids"][0].tolist() == [int(t == pad_id) for t in row["input_ids"]]


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_image_tokens_never_trained_even_with_train_on_prompt(tmp_path, family, llava_dir, qwen_dir):
    model_dir = llava_dir if family == "llava" else qwen_dir
    data = _data(image_data_dir(tmp_path / "d"), tmp_path, train_on_prompt=True)
    _, vision, prepared = _prepared(model_dir, data)
    for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"], strict=True):
        first = ids.index(vision.image_token_id)
        assert labels[:first] == ids[:first]  # the prompt before the image trains (train_on_prompt)
        for token, label in zip(ids, labels, strict=True):
            if token == vision.image_token_id:
                assert label == IGNORE_INDEX
        after = len(ids) - ids[::-1].index(vision.image_token_id)
        assert labels[after : after + 3] == ids[after : after + 3]  # and the text right after it


def test_image_max_pixels_scales_before_the_processor(tmp_path, qwen_dir):
    data_dir = image_data_dir(tmp_path / "d")
    tokenizer = _tokenizer(qwen_dir)
    small = load_vision(qwen_dir, tokenizer, max_pixels=28 * 28, min_pixels=1)
    big = load_vision(qwen_dir, tokenizer)
    image = big.load(str(data_dir / "images" / "red.png"))
    assert image.size == (56, 56)
    assert small.load(str(data_dir / "images" / "red.png")).size == (28, 28)
    assert small.token_counts(small.pixels([small.load(str(data_dir / "images" / "red.png"))])) == [1]
    assert big.token_counts(big.pixels([image])) == [4]
    assert small.fingerprint() != big.fingerprint()


# ---- the row forms ----


def test_openai_content_parts_with_paths_and_data_urls(tmp_path, llava_dir):
    data_dir = image_data_dir(tmp_path / "d")
    payload = base64.b64encode((data_dir / "images" / "green.png").read_bytes()).decode()
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare "},
                        {"type": "image_url", "image_url": {"url": "images/red.png"}},
                        {"type": "text", "text": " and "},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{payload}"}},
                    ],
                },
                {"role": "assistant", "content": "Red and green."},
            ]
        }
    ]
    (data_dir / "parts.json").write_text(json.dumps(rows))
    (data_dir / "dataset_info.json").write_text(
        json.dumps({"parts": {"file_name": "parts.json", "formatting": "openai"}})
    )
    loaded = load_conversations(["parts"], _data(data_dir, tmp_path, "parts"), seed=0)
    assert loaded[0]["messages"][0]["content"] == "Compare <image> and <image>"
    assert loaded[0]["images"][0] == str((data_dir / "images" / "red.png").resolve())
    assert loaded[0]["images"][1].startswith("data:image/png;base64,")
    _, vision, prepared = _prepared(llava_dir, _data(data_dir, tmp_path, "parts"))
    assert prepared.train[0]["input_ids"].count(vision.image_token_id) == 8


def test_alpaca_rows_and_paths_beside_the_file(tmp_path):
    data_dir = image_data_dir(tmp_path / "d")
    sub = data_dir / "sub"
    write_png(sub / "pic.png", "red")
    rows = [{"instruction": "<image>Colour?", "output": "Red.", "images": ["pic.png"]}]
    (sub / "a.json").write_text(json.dumps(rows))
    (data_dir / "dataset_info.json").write_text(
        json.dumps(
            {
                "a": {
                    "file_name": "sub/a.json",
                    "columns": {"prompt": "instruction", "response": "output", "images": "images"},
                }
            }
        )  # fmt: skip
    )
    loaded = load_conversations(["a"], _data(data_dir, tmp_path, "a"), seed=0)
    assert loaded[0]["images"] == [str((sub / "pic.png").resolve())]


def _bad(tmp_path: Path, row: dict) -> str:
    data_dir = image_data_dir(tmp_path / "d", [image_rows(1)[0], row])
    with pytest.raises(SftflowError) as caught:
        load_conversations(["pics"], _data(data_dir, tmp_path), seed=0)
    return str(caught.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"images": []}, r"row 1: the text has 1 <image> placeholder\(s\) but column 'images' lists 0"),
        (
            {"images": ["images/red.png", "images/red.png"]},
            r"row 1: the text has 1 <image> placeholder\(s\) but column 'images' lists 2",
        ),
        ({"images": ["images/nope.png"]}, r"row 1: images\[0\]: file 'images/nope.png' not found \(tried "),
        ({"images": ["images/broken.png"]}, r"row 1: images\[0\]: .*broken.png' is not a readable image"),
        ({"images": "images/red.png", "extra": 1}, None),  # a single path string is a list of one
    ],
)
def test_bad_image_rows_name_the_row(tmp_path, change, expected):
    (tmp_path / "d" / "images").mkdir(parents=True)
    png = write_png(tmp_path / "d" / "images" / "full.png", "red").read_bytes()
    (tmp_path / "d" / "images" / "broken.png").write_bytes(png[: len(png) // 2])  # truncated
    row = {**image_rows(1)[0], **change}
    if expected is None:
        data_dir = image_data_dir(tmp_path / "d", [row])
        assert len(load_conversations(["pics"], _data(data_dir, tmp_path), seed=0)) == 1
        return
    message = _bad(tmp_path, row)
    assert "pics.json: 1 of 2 rows are malformed" in message
    import re

    line = next(line for line in message.splitlines() if line.strip().startswith("row 1:"))
    assert re.search(expected, line), line


def test_image_in_an_answer_and_corrupt_data_url_are_row_errors(tmp_path):
    row = image_rows(1)[0]
    row["messages"][1]["content"] = "<image> it is red"
    row["images"] = ["images/red.png", "images/red.png"]
    assert "row 1: message 1 (assistant) holds <image>" in _bad(tmp_path, row)
    row = {**image_rows(1)[0], "images": ["data:image/png;base64,AAAA"]}
    assert "row 1: images[0]: a data: URL is not a readable image" in _bad(tmp_path, row)


def test_registry_images_only_in_sft_and_no_videos(tmp_path):
    data_dir = image_data_dir(tmp_path / "d")
    entry = {"file_name": "pics.json", **MLLM_ENTRY}
    registry = {"pics": entry, "vids": {**entry, "columns": {"messages": "messages", "videos": "v"}}}
    (data_dir / "dataset_info.json").write_text(json.dumps(registry))
    with pytest.raises(SftflowError, match="maps \\['videos'\\]: videos and audios are not supported"):
        load_conversations(["vids"], _data(data_dir, tmp_path, "vids"), seed=0)
    with pytest.raises(SftflowError, match="maps images, which only the sft stage reads"):
        load_conversations(["pics"], _data(data_dir, tmp_path), seed=0, stage="kto")


def test_text_rows_keep_literal_image_text_without_an_images_column(tmp_path, tiny_model_dir):
    data_dir = image_data_dir(
        tmp_path / "d", text_rows=[{"instruction": "What is <image>?", "output": "A tag."}]
    )
    loaded = load_conversations(["words"], _data(data_dir, tmp_path, "words"), seed=0)
    assert loaded[0]["images"] == [] and "<image>" in loaded[0]["messages"][0]["content"]


# ---- text models, mixed batches, the cutoff, the cache ----


def test_image_rows_on_a_text_model_are_refused(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = _data(image_data_dir(tmp_path / "d"), tmp_path)
    assert load_vision(tiny_model_dir, tiny_tokenizer) is None
    with pytest.raises(SftflowError, match="train: 6 rows have images, but the model is text-only"):
        prepare("sft", data, tiny_tokenizer, seed=0)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_mixed_text_and_image_batches(tmp_path, family, llava_dir, qwen_dir):
    from transformers import AutoModelForImageTextToText

    model_dir = llava_dir if family == "llava" else qwen_dir
    words = [{"instruction": "Say hi", "output": "Hi."}, {"instruction": "Say bye", "output": "Bye."}]
    data = _data(image_data_dir(tmp_path / "d", image_rows(2), words), tmp_path, "pics,words")
    tokenizer, vision, prepared = _prepared(model_dir, data)
    rows = [prepared.train[i] for i in range(4)]
    assert [len(r["images"]) for r in rows] == [1, 1, 0, 0]
    collate = VisionCollator(tokenizer.pad_token_id, vision)
    mixed = collate([rows[2], rows[0], rows[3], rows[1]])
    assert mixed["pixel_values"].shape[0] == (2 if family == "llava" else 32)
    text_only = collate(rows[2:])
    assert "pixel_values" not in text_only
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    for batch in (mixed, text_only):
        loss = model(**batch).loss
        assert loss.isfinite()
    # the mixed batch's loss on each row equals that row's loss alone (padding and pixels line up)
    alone = [model(**collate([r])).loss.item() for r in (rows[2], rows[0])]
    pair = collate([rows[2], rows[0]])
    import torch

    logits = model(**pair).logits
    for i, expected in enumerate(alone):
        labels = pair["labels"][i, 1:]
        keep = labels != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits[i, :-1][keep], labels[keep])
        assert abs(loss.item() - expected) < 1e-4


def test_cutoff_never_cuts_an_image_run(tmp_path, llava_dir, caplog):
    rows = image_rows(2)
    rows[1]["messages"][0]["content"] = "word " * 60 + "<image>What colour is this square?"
    data = _data(image_data_dir(tmp_path / "d", rows), tmp_path, cutoff_len=80)
    _, vision, prepared = _prepared(llava_dir, data)
    assert len(prepared.train) == 1
    assert prepared.meta["splits"]["train"]["dropped"] == 1
    assert prepared.train[0]["input_ids"].count(vision.image_token_id) == 4
    assert "cutoff_len would cut an image (" in caplog.text


def test_cache_rebuilds_when_an_image_changes(tmp_path, qwen_dir):
    data_dir = image_data_dir(tmp_path / "d", image_rows(1))
    data = _data(data_dir, tmp_path)
    _, vision, first = _prepared(qwen_dir, data)
    assert first.train[0]["input_ids"].count(vision.image_token_id) == 4
    write_png(data_dir / "images" / "red.png", "red", size=(28, 28))  # same path, fewer pixels
    _, _, second = _prepared(qwen_dir, data)
    assert second.train[0]["input_ids"].count(vision.image_token_id) == 1
    _, _, third = _prepared(qwen_dir, data)  # unchanged now: the cache answers
    assert third.train[0]["input_ids"] == second.train[0]["input_ids"]


def test_unknown_vision_family_is_refused(tmp_path, tiny_tokenizer):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3", "vision_config": {}}))
    with pytest.raises(SftflowError, match="'idefics3' .* supports llava, qwen2_5_vl, qwen2_vl"):
        load_vision(tmp_path, tiny_tokenizer)


def test_streamed_image_rows_tokenize_lazily(tmp_path, llava_dir):
    data = _data(image_data_dir(tmp_path / "d"), tmp_path, streaming=True)
    _, vision, prepared = _prepared(llava_dir, data)
    row = next(iter(prepared.train))
    assert row["input_ids"].count(vision.image_token_id) == 4 and row["images"][0].endswith(".png")


LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endfor %}"
)


def test_a_template_that_drops_string_content_is_refused(llava_dir):
    tokenizer = _tokenizer(llava_dir)
    tokenizer.chat_template = LLAVA_HF_TEMPLATE  # renders nothing for string content
    with pytest.raises(
        SftflowError, match="does not write string message content .*e.g. vicuna for LLaVA-1.5"
    ):
        load_vision(llava_dir, tokenizer)


def test_an_image_broken_after_its_rows_were_read_is_one_line(tmp_path, llava_dir):
    data_dir = image_data_dir(tmp_path / "d", image_rows(1))
    data = _data(data_dir, tmp_path)
    _prepared(llava_dir, data)  # rows converted (and cached by datasets) with the image whole
    (data_dir / "images" / "red.png").write_bytes(b"not a png")
    with pytest.raises(
        SftflowError, match=r"^train: '.*red.png' is not a readable image .*; fix or restore it"
    ):
        _prepared(llava_dir, data)
