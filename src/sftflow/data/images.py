"""Images in sft rows, LLaMA-Factory's form: an `images` column (a list of paths) and one `<image>`
placeholder in the text per image, in order; or OpenAI content parts
(`{"type": "image_url", "image_url": {"url": ...}}`), which become `<image>` placeholders in the text.

A path is absolute, or relative to dataset_dir, or relative to the data file's folder (tried in that
order, as LLaMA-Factory's media_dir defaults to dataset_dir); a `data:image/...;base64,` URL is kept as
is. Every image is opened and verified when its row is converted, so a missing, unreadable or corrupt
file is a `RowError` naming the row and the image. Placeholders are counted per row: a row whose count
differs from its images is a `RowError` too, and an image in an assistant answer is refused (image
tokens are never trained).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE = "<image>"
DATA_URL = "data:"


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable or corrupt (the message says which)."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_image(ref: Any, dirs: tuple[Path, ...]) -> str:
    """The image `ref` as stored in a converted row: an absolute path, or the data URL itself.

    >>> resolve_image("data:image/png;base64,AAAA", ())
    'data:image/png;base64,AAAA'

    Raises:
        ImageError: `ref` is not a string, or no file exists at any of the candidate paths.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError(f"should be a path or a data: URL, got {_short(ref)}")
    if ref.startswith(DATA_URL):
        return ref
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [d / path for d in dirs]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    tried = ", ".join(str(c) for c in candidates) or ref
    raise ImageError(f"file {ref!r} not found (tried {tried})")


def image_bytes(ref: str) -> bytes:
    """The encoded bytes of a resolved image (a file's content, or a data URL's payload).

    Raises:
        ImageError: the file cannot be read or the data URL is not base64.
    """
    if ref.startswith(DATA_URL):
        head, _, payload = ref.partition(",")
        if ";base64" not in head:
            raise ImageError("a data: URL must be base64 (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data: URL's payload is not valid base64") from None
    try:
        return Path(ref).read_bytes()
    except OSError as exc:
        raise ImageError(f"file {ref!r} cannot be read ({exc.strerror or exc})") from None


def _name(ref: str) -> str:
    return "a data: URL" if ref.startswith(DATA_URL) else repr(ref)


def open_image(ref: str) -> Image:
    """The decoded image of a resolved ref, in RGB.

    Raises:
        ImageError: the bytes are not an image PIL can decode (corrupt or truncated).
    """
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    data = image_bytes(ref)
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{_name(ref)} is not a readable image ({type(exc).__name__}: {exc})") from None


def check_image(ref: str) -> None:
    """Open and fully decode `ref` (raises `ImageError` as `open_image`)."""
    open_image(ref)


def content_parts(content: Any, where: str) -> tuple[str, list[str]]:
    """OpenAI content parts as one text with an `<image>` per image part, and the image urls in order.

    >>> content_parts([{"type": "text", "text": "What is"}, {"type": "image_url",
    ...     "image_url": {"url": "a.png"}}, {"type": "text", "text": "?"}], "messages[0]")
    ('What is<image>?', ['a.png'])

    Raises:
        ImageError: a part is neither text nor image_url, or lacks its text / url.
    """
    text, urls = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise ImageError(f"{where}.content[{i}] is an image_url part without a url string")
            text.append(IMAGE)
            urls.append(url)
        else:
            raise ImageError(
                f"{where}.content[{i}] must be {{'type': 'text', 'text': ...}} or "
                f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}, got {_short(part)}"
            )
    return "".join(text), urls


def check_placeholders(messages: list[dict[str, str]], images: list[str], where: str) -> None:
    """Exactly one `<image>` per image, none in an assistant answer.

    Raises:
        ImageError: the counts differ, or an answer holds a placeholder.
    """
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and IMAGE in message["content"]:
            raise ImageError(
                f"message {i} (assistant) holds {IMAGE}: images go in user turns (image tokens are never "
                "trained)"
            )
    count = sum(m["content"].count(IMAGE) for m in messages)
    if count != len(images):
        raise ImageError(
            f"the text has {count} {IMAGE} placeholder(s) but {where} lists {len(images)} image(s); "
            f"write one {IMAGE} where each image goes, in order"
        )
