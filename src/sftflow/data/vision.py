"""Models that see: each `<image>` placeholder becomes the model's own run of image tokens, and batches
carry the pixels the run stands for.

Families (`FAMILIES`, by the config's `model_type`):
  - llava: `<image>` x N, N = (H // patch) * (W // patch) + num_additional_image_tokens, minus one with
    vision_feature_select_strategy "default" (H, W: the processed image's size, as LlavaProcessor counts);
  - qwen2_vl: `<|vision_start|>` `<|image_pad|>` x N `<|vision_end|>`, N = t * h * w / merge_size^2 of
    the image's `image_grid_thw`; batches also carry `image_grid_thw` and `mm_token_type_ids` (1 on image
    tokens), which M-RoPE needs.
Other models with a vision tower are refused naming these families.

Each image is first scaled to fit `image_max_pixels` / `image_min_pixels` (width x height, aspect kept,
as LLaMA-Factory does), then given to the model's image processor, at tokenize time (to count its tokens)
and again when its batch is built (the pixels; they are not cached). The tokenized cache entry records
the sha256 of every image file it counted and is rebuilt when one changes (`image_digests`).

Labels: image tokens are never trained (-100, also with train_on_prompt); the text around them keeps the
exact masks of `encode.py`. cutoff_len never cuts inside an image run: a row whose image tokens do not
all survive the cutoff policy is dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sftflow.data.collator import SftCollator
from sftflow.data.content import file_digest
from sftflow.data.encode import IGNORE_INDEX, Encoded
from sftflow.data.images import DATA_URL, IMAGE, ImageError, open_image
from sftflow.data.template import render
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from pathlib import Path

    from PIL.Image import Image
    from transformers import PreTrainedTokenizerBase

FAMILIES = {"llava": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl"}
DEFAULT_MAX_PIXELS = 768 * 768
DEFAULT_MIN_PIXELS = 32 * 32
QWEN_START, QWEN_PAD, QWEN_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


@dataclass
class Vision:
    """What the data step and the collator need to know about a model that sees."""

    family: str
    model_type: str
    image_token: str
    image_token_id: int
    processor: Any  # the model's image processor
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_pixels: int = DEFAULT_MIN_PIXELS
    patch_size: int = 14  # llava
    num_additional_image_tokens: int = 0  # llava
    feature_strategy: str = "default"  # llava
    merge_size: int = 2  # qwen2_vl

    def fingerprint(self) -> str:
        """A hash of everything that decides the image runs (part of the tokenized cache key)."""
        config = self.processor.to_dict() if hasattr(self.processor, "to_dict") else repr(self.processor)
        material = [
            self.family,
            self.image_token,
            self.image_token_id,
            self.max_pixels,
            self.min_pixels,
            self.patch_size,
            self.num_additional_image_tokens,
            self.feature_strategy,
            self.merge_size,
            config,
        ]
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def load(self, ref: str) -> Image:
        """The image at `ref`, scaled into [min_pixels, max_pixels] (aspect kept)."""
        return fit_pixels(open_image(ref), self.max_pixels, self.min_pixels)

    def pixels(self, images: list[Image]) -> dict[str, Any]:
        """The processor's tensors for `images` in order: pixel_values (and image_grid_thw for qwen2_vl)."""
        out = self.processor(images=images, return_tensors="pt")
        keys = ["pixel_values", "image_grid_thw"] if self.family == "qwen2_vl" else ["pixel_values"]
        return {key: out[key] for key in keys}

    def token_counts(self, tensors: dict[str, Any]) -> list[int]:
        """Image tokens per image of `pixels(...)`'s output."""
        if self.family == "qwen2_vl":
            return [int(math.prod(grid)) // self.merge_size**2 for grid in tensors["image_grid_thw"].tolist()]
        values = tensors["pixel_values"]
        height, width = values.shape[-2:]
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        if self.feature_strategy == "default":
            count -= 1
        return [count] * values.shape[0]

    def run(self, count: int) -> str:
        """The text one image becomes: its tokens (and the family's delimiters)."""
        if self.family == "qwen2_vl":
            return QWEN_START + QWEN_PAD * count + QWEN_END
        return self.image_token * count

    def expand(self, messages: list[dict[str, str]], counts: list[int]) -> list[dict[str, str]]:
        """`messages` with the k-th `<image>` replaced by `run(counts[k])`."""
        todo = iter(counts)
        out = []
        for message in messages:
            pieces = message["content"].split(IMAGE)
            text = pieces[0] + "".join(self.run(next(todo)) + piece for piece in pieces[1:])
            out.append({**message, "content": text})
        return out


def fit_pixels(image: Image, max_pixels: int, min_pixels: int) -> Image:
    """`image` scaled (aspect kept) so width x height lies within [min_pixels, max_pixels].

    >>> from PIL import Image
    >>> fit_pixels(Image.new("RGB", (200, 100)), 50 * 25, 1).size
    (50, 25)
    """
    width, height = image.size
    area = width * height
    if area > max_pixels:
        factor = math.sqrt(max_pixels / area)
    elif area < min_pixels:
        factor = math.sqrt(min_pixels / area)
    else:
        return image
    size = (max(1, int(width * factor)), max(1, int(height * factor)))
    return image.resize(size)


def vision_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The model dir's config.json when it describes a model with a vision tower, else None."""
    from pathlib import Path

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return config if "vision_config" in config else None


def load_vision(
    model_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_pixels: int = DEFAULT_MIN_PIXELS,
) -> Vision | None:
    """The `Vision` of the model at `model_dir` (a local dir), or None for a text-only model.

    Raises:
        SftflowError: a model with a vision tower of a family sftflow cannot feed, or one without the
            image processor or image tokens it needs.
    """
    config = vision_config(model_dir)
    if config is None:
        return None
    model_type = config.get("model_type", "?")
    family = FAMILIES.get(model_type)
    if family is None:
        raise SftflowError(
            f"model_type {model_type!r} ({model_dir}) has a vision tower sftflow cannot feed yet; image "
            f"fine-tuning supports {', '.join(sorted(FAMILIES))}."
        )
    if not 1 <= min_pixels <= max_pixels:
        raise SftflowError(
            f"image_min_pixels ({min_pixels}) must be >= 1 and <= image_max_pixels ({max_pixels})."
        )
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise SftflowError(
            f"{model_dir}: the image processor cannot be loaded ({str(exc).splitlines()[0][:200]}); the model "
            "dir needs its preprocessor_config.json (or processor_config.json)."
        ) from None
    check_template(tokenizer, model_dir)
    vision = Vision(family, model_type, "", -1, processor, max_pixels, min_pixels)
    if family == "qwen2_vl":
        vision.image_token = QWEN_PAD
        vision.merge_size = int(config["vision_config"].get("spatial_merge_size", 2))
        tokens = [QWEN_START, QWEN_PAD, QWEN_END]
    else:
        _llava_settings(vision, config, model_dir)
        tokens = [vision.image_token]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    missing = [t for t, i in zip(tokens, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise SftflowError(
            f"{model_dir}: the tokenizer has no {missing} token(s) that {model_type} images need."
        )
    vision.image_token_id = tokenizer.convert_tokens_to_ids(vision.image_token)
    expected = config.get("image_token_id", config.get("image_token_index"))
    if expected is not None and expected != vision.image_token_id:
        raise SftflowError(
            f"{model_dir}: the tokenizer's {vision.image_token} is id {vision.image_token_id} but the model "
            f"expects image_token_id {expected}."
        )
    return vision


PROBE_QUESTION, PROBE_ANSWER = "sftflow probe question", "sftflow probe answer"


def check_template(tokenizer: PreTrainedTokenizerBase, model_dir: str | Path) -> None:
    """The chat template must write string message content: the image runs are written into it.

    Raises:
        SftflowError: the template drops it (llava-hf templates read only content lists, and render
            nothing for a string).
    """
    messages = [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_ANSWER}]
    try:
        text = render(tokenizer, messages)
    except Exception as exc:  # noqa: BLE001  # a template that refuses string content
        text = f"({type(exc).__name__}: {exc})"
    if PROBE_QUESTION not in text or PROBE_ANSWER not in text:
        raise SftflowError(
            f"the chat template of {model_dir} does not write string message content (it rendered a probe "
            f"chat as {text[:120]!r}); llava-hf templates read only content lists. Set template: to a "
            "built-in that matches the model (e.g. vicuna for LLaVA-1.5), or template_file."
        )


def _llava_settings(vision: Vision, config: dict[str, Any], model_dir: str | Path) -> None:
    """LLaVA's token count settings: the processor config's (processor_config.json), else the model's."""
    from pathlib import Path

    saved: dict[str, Any] = {}
    path = Path(model_dir) / "processor_config.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
    vision_cfg = config["vision_config"]
    vision.image_token = saved.get("image_token", "<image>")
    vision.patch_size = int(saved.get("patch_size") or vision_cfg.get("patch_size", 14))
    vision.feature_strategy = saved.get("vision_feature_select_strategy") or config.get(
        "vision_feature_select_strategy", "default"
    )
    # CLIP towers output a class token besides the patches (SigLIP ones do not)
    has_cls = vision_cfg.get("model_type", "clip_vision_model").startswith("clip")
    vision.num_additional_image_tokens = int(saved.get("num_additional_image_tokens", 1 if has_cls else 0))


def image_runs_ok(input_ids: list[int], vision: Vision, counts: list[int]) -> bool:
    """Whether `input_ids` hold exactly the image tokens of `counts` (no run cut, none stray)."""
    return sum(1 for t in input_ids if t == vision.image_token_id) == sum(counts)


def mask_images(encoded: Encoded, vision: Vision, counts: list[int]) -> Encoded:
    """`encoded` with its image tokens untrained, or dropped when the cutoff cut into an image run (or the
    text holds the image token with no image behind it)."""
    if encoded.dropped:
        return encoded
    if not image_runs_ok(encoded.input_ids, vision, counts):
        kept = sum(1 for t in encoded.input_ids if t == vision.image_token_id)
        reason = (
            f"cutoff_len would cut an image ({kept} of {sum(counts)} image tokens kept); image rows are "
            "dropped, never cut inside an image"
            if kept < sum(counts)
            else f"the text holds {kept - sum(counts)} {vision.image_token} token(s) with no image behind them"
        )
        return Encoded([], [], True, dropped=reason, full_length=encoded.full_length)
    labels = [
        IGNORE_INDEX if t == vision.image_token_id else label
        for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
    ]
    return Encoded(encoded.input_ids, labels, encoded.truncated, "", encoded.full_length)


def image_digests(refs: list[str]) -> dict[str, str]:
    """sha256 of each image file among `refs` (data: URLs are part of the data file, so not listed)."""
    from pathlib import Path

    out = {}
    for ref in dict.fromkeys(refs):
        if not ref.startswith(DATA_URL):
            try:
                out[ref] = file_digest(Path(ref))
            except OSError:
                out[ref] = "missing"
    return out


@dataclass
class VisionCollator:
    """`SftCollator` batches plus the pixels of their images (rows' `images` column), in row order:
    pixel_values (and, for qwen2_vl, image_grid_thw and mm_token_type_ids). A batch of text rows gets no
    pixels. Each batch's image tokens are checked against the processed images (an image file changed
    since it was tokenized is an error, not a silent mismatch)."""

    pad_token_id: int
    vision: Vision
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        refs = [ref for f in features for ref in (f.get("images") or [])]
        texts = [{k: v for k, v in f.items() if k != "images"} for f in features]
        batch = SftCollator(self.pad_token_id, self.padding_side)(texts)  # type: ignore[arg-type]
        image_mask = batch["input_ids"] == self.vision.image_token_id
        image_mask &= batch["attention_mask"].bool()
        if self.vision.family == "qwen2_vl":
            batch["mm_token_type_ids"] = image_mask.long()
        if not refs:
            return batch
        try:
            tensors = self.vision.pixels([self.vision.load(ref) for ref in refs])
        except ImageError as exc:
            raise SftflowError(f"building a batch: {exc}") from None
        counts = self.vision.token_counts(tensors)
        if sum(counts) != int(image_mask.sum()):
            raise SftflowError(
                f"a batch holds {int(image_mask.sum())} image tokens but its {len(refs)} images make {sum(counts)}: "
                "an image file changed after the data was tokenized; run again with overwrite_cache: true."
            )
        batch.update(tensors)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
        return batch
