"""Tiny models that see, built from configs offline and saved with their tokenizer and image processor: a
LLaVA (CLIP tower, Llama text model) and a Qwen2-VL, one layer each. Plus small PNGs and image datasets."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import build_tokenizer

QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _text_config(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def build_llava(path: Path, seed: int = 0) -> Path:
    """A LLaVA whose CLIP tower sees 28x28 crops in 14-pixel patches: 4 image tokens per image."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14, projection_dim=32,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(path)
    return path


def build_qwen2_vl(path: Path, seed: int = 0) -> Path:
    """A Qwen2-VL whose image processor keeps images within 28x28..56x56 pixels (1 to 4 image tokens)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    tokenizer.add_special_tokens({"extra_special_tokens": QWEN_TOKENS}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(QWEN_TOKENS)
    text = _text_config(tokenizer) | {
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },  # fmt: skip
        vision_start_token_id=ids[0],
        image_token_id=ids[1],
        vision_end_token_id=ids[2],
        video_token_id=ids[3],
    )
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    """A Qwen2.5-VL (windowed vision attention, the same parts and image tokens as Qwen2-VL)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    tokenizer.add_special_tokens({"extra_special_tokens": QWEN_TOKENS}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(QWEN_TOKENS)
    text = _text_config(tokenizer) | {
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    }
    vision = {
        "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 28,
        "fullatt_block_indexes": [0],
    }  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        vision_start_token_id=ids[0],
        image_token_id=ids[1],
        vision_end_token_id=ids[2],
        video_token_id=ids[3],
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def write_png(path: Path, colour: str, size: tuple[int, int] = (56, 56)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


def image_rows(n: int = 6) -> list[dict]:
    """sharegpt rows (OpenAI role/content tags, LLaMA-Factory's mllm_demo form) about coloured squares."""
    names = list(COLOURS)
    return [
        {
            "messages": [
                {"role": "user", "content": "<image>What colour is this square?"},
                {"role": "assistant", "content": f"It is {names[i % 3]}."},
            ],
            "images": [f"images/{names[i % 3]}.png"],
        }
        for i in range(n)
    ]


MLLM_ENTRY = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
}


def image_data_dir(root: Path, rows: list[dict] | None = None, text_rows: list[dict] | None = None) -> Path:
    """A dataset_dir with images/{red,green,blue}.png, `pics` (image rows) and `words` (text rows)."""
    root.mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        write_png(root / "images" / f"{colour}.png", colour)
    (root / "pics.json").write_text(json.dumps(rows if rows is not None else image_rows()), encoding="utf-8")
    registry = {"pics": {"file_name": "pics.json", **MLLM_ENTRY}}
    if text_rows is not None:
        (root / "words.json").write_text(json.dumps(text_rows), encoding="utf-8")
        registry["words"] = {"file_name": "words.json"}
    (root / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    return root
