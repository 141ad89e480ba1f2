"""Regenerate the shapes demo (`python data/shapes/make.py`): 24 small PNGs of coloured shapes and the
questions about them, in LLaMA-Factory's image form (an `images` list and `<image>` placeholders).

shapes.json trains (one question per image about its shape, one about its colour, and two-image
comparisons); shapes_heldout.json asks the same kinds of questions in other words, for eval and predict.
Deterministic: the same files every time.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (50, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"large": 52, "small": 28}


def draw(shape: str, colour: str, size: str) -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    side = SIZES[size]
    left = top = (64 - side) // 2
    box = (left, top, left + side, top + side)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon(
            [(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=COLOURS[colour]
        )
    return image


def row(question: str, answer: str, images: list[str]) -> dict:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "images": images,
    }


def main() -> None:
    names = []
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                name = f"images/{size}_{colour}_{shape}.png"
                draw(shape, colour, size).save(HERE / name, optimize=True)
                names.append((name, shape, colour, size))
    train, heldout = [], []
    for name, shape, colour, size in names:
        train.append(row("<image>What shape is this?", f"It is a {size} {shape}.", [name]))
        train.append(row("<image>What colour is the shape?", f"The {shape} is {colour}.", [name]))
        heldout.append(row("<image>Describe the picture.", f"A {size} {colour} {shape} on white.", [name]))
    for (a, shape_a, _, _), (b, shape_b, _, _) in zip(names[::4], names[6::4], strict=False):
        train.append(
            row(
                "<image><image>Do these two pictures show the same shape?",
                "Yes, both are " + shape_a + "s."
                if shape_a == shape_b
                else f"No: a {shape_a}, then a {shape_b}.",
                [a, b],
            )
        )
    (HERE / "shapes.json").write_text(json.dumps(train, indent=1) + "\n", encoding="utf-8")
    (HERE / "shapes_heldout.json").write_text(json.dumps(heldout[::4], indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
