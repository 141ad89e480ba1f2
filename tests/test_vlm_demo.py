"""The shapes demo (data/shapes, registered in data/dataset_info.json) and examples/vlm_sft.yaml: the data
loads, its generator reproduces it, preview shows image runs compactly, and the example config trains a
tiny Qwen2-VL and writes its image processor beside the adapter."""

from __future__ import annotations

import hashlib
import json
import runpy
import shutil
from pathlib import Path

import pytest

from sftflow.config.args import DataArguments
from sftflow.data.loader import load_conversations
from vlm_models import build_qwen2_vl

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data" / "shapes"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_qwen2_vl(tmp_path_factory.mktemp("qwen2vl"))


def test_shapes_demo_loads_and_every_image_resolves(tmp_path):
    data = DataArguments(dataset=["shapes"], dataset_dir=str(ROOT / "data"))
    rows = load_conversations(["shapes"], data, seed=0)
    heldout = load_conversations(["shapes_heldout"], data, seed=0)
    assert (len(rows), len(heldout)) == (53, 6)
    images = {ref for refs in rows["images"] for ref in refs}
    assert images == {str(p.resolve()) for p in (SHAPES / "images").glob("*.png")} and len(images) == 24
    assert sum(len(refs) == 2 for refs in rows["images"]) == 5  # the two-image comparisons


def test_shapes_generator_reproduces_the_shipped_files(tmp_path):
    copy = tmp_path / "shapes"
    (copy / "images").mkdir(parents=True)
    shutil.copy(SHAPES / "make.py", copy / "make.py")
    runpy.run_path(str(copy / "make.py"), run_name="__main__")

    def digest(root: Path) -> dict[str, str]:
        files = [*root.glob("*.json"), *root.glob("images/*.png")]
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    assert digest(copy) == digest(SHAPES)


def _example(tmp_path: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "examples" / "vlm_sft.yaml"),
        f"model_name_or_path={model_dir}",
        f"dataset_dir={ROOT / 'data'}",
        f"output_dir={tmp_path / 'out'}",
        f"tokenized_cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


def test_preview_shows_image_runs(tmp_path, qwen_dir, capsys):
    from sftflow.cli import main

    assert main(["preview", *_example(tmp_path, qwen_dir), "--n", "1"]) == 0
    out = capsys.readouterr().out
    # the 64x64 PNG is kept by image_max_pixels, then fitted into the tiny processor's 56x56: 4 tokens
    assert "<|vision_start|><image_pad x 4 tokens><|vision_end|>What shape is this?" in out
    assert "shapes: 53 rows read, 0 skipped as malformed, 53 used" in out


@pytest.mark.integration
def test_example_config_trains_a_tiny_qwen2_vl(tmp_path, qwen_dir):
    from sftflow.cli import main

    extra = ["max_steps=2", "max_samples=8", "do_predict=false", "per_device_train_batch_size=2"]
    assert main(["train", *_example(tmp_path, qwen_dir, *extra)]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "all_results.json").read_text())["eval_loss"] > 0
