"""Export details (#28): the exported chat template's default system prompt is the one every training row
had (as the Modelfile's SYSTEM), not the base tokenizer's; GGUF `general.name` is the model's name, not the
export folder's."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoTokenizer

from sftflow.cli import main as cli_main
from sftflow.model.gguf import read_gguf_metadata

USER = [{"role": "user", "content": "What is 1 plus 1?"}]


def test_with_default_system_only_fills_a_missing_system(tiny_tokenizer):
    from sftflow.model.modelfile import with_default_system

    template = with_default_system(tiny_tokenizer.chat_template, 'Be "brief".\nReally.')
    render = lambda msgs, t: tiny_tokenizer.apply_chat_template(msgs, chat_template=t, tokenize=False)  # noqa: E731
    with_system = [{"role": "system", "content": 'Be "brief".\nReally.'}, *USER]
    assert render(USER, template) == render(with_system, tiny_tokenizer.chat_template)
    other = [{"role": "system", "content": "Other."}, *USER]
    assert render(other, template) == render(other, tiny_tokenizer.chat_template)
    assert "tiny test model" not in render(USER, template)


def export(tmp_path, tiny_model_dir, toy_data_dir, fmt: str, name: str = "merged-folder"):
    export_dir = tmp_path / name
    config = tmp_path / f"export-{fmt}.yaml"
    keys = {"model_name_or_path": str(tiny_model_dir), "export_dir": str(export_dir), "export_format": fmt,
            "dataset_dir": str(toy_data_dir), "dataset": "toy"}  # fmt: skip
    config.write_text(yaml.safe_dump(keys))
    assert cli_main(["export", str(config)]) == 0
    return export_dir


@pytest.mark.integration
def test_exported_template_defaults_to_the_training_system_prompt(tmp_path, tiny_model_dir, toy_data_dir):
    export_dir = export(tmp_path, tiny_model_dir, toy_data_dir, "gguf")
    exported = AutoTokenizer.from_pretrained(export_dir)
    text = exported.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n"), text  # every toy row's system
    assert "tiny test model" not in text  # the base tokenizer's default
    meta = read_gguf_metadata(export_dir / "model-f16.gguf")
    assert meta["tokenizer.chat_template"] == exported.chat_template
    assert 'SYSTEM """Be brief."""' in (export_dir / "Modelfile").read_text()
    assert meta["general.name"] == tiny_model_dir.name != export_dir.name


def test_model_name_follows_a_run_dir_to_its_base(tmp_path):
    from sftflow.model.export import model_name

    assert model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert model_name("/models/smollm2-135m-instruct/") == "smollm2-135m-instruct"
    run = tmp_path / "saves" / "full-run"
    run.mkdir(parents=True)
    (run / "sftflow_args.yaml").write_text(yaml.safe_dump({"model_name_or_path": "org/Base-1B"}))
    assert model_name(str(run)) == "Base-1B"
    (run / "sftflow_args.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(run)}))  # itself
    assert model_name(str(run)) == "full-run"
