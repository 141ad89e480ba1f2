"""Scale-out settings are honoured or refused, never run as something else: FSDP on CPU is refused with
the reason (the HF Trainer would run plain DDP or fail inside its constructor), `stage: ppo` says why it
is out of scope, and the FSDP example has the shape transformers reads (the DeepSpeed JSONs are checked in
tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sftflow.cli import main
from sftflow.config import load_args
from sftflow.errors import SftflowError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_fsdp_on_cpu_is_refused_before_anything_loads(tmp_path, capsys):
    for extra in ([], ["use_cpu=true"]):
        code = main(
            ["train", str(EXAMPLES / "fsdp_sft.yaml"), "bf16=false", f"output_dir={tmp_path}", *extra]
        )
        err = capsys.readouterr().err
        assert code == 2 and "sftflow error: fsdp needs CUDA GPUs" in err and "Traceback" not in err


def test_ppo_is_refused_with_the_reason_not_a_near_name():
    with pytest.raises(SftflowError, match="stage: ppo is out of scope") as info:
        load_args(None, ["model_name_or_path=m", "output_dir=o", "stage=ppo"])
    assert "did you mean" not in str(info.value).lower()


def test_fsdp_example_is_what_transformers_reads_as_fsdp2():
    from transformers import Seq2SeqTrainingArguments

    config = yaml.safe_load((EXAMPLES / "fsdp_sft.yaml").read_text())
    args = Seq2SeqTrainingArguments(
        output_dir="unused", fsdp=config["fsdp"], fsdp_config=config["fsdp_config"]
    )
    assert args.fsdp is True  # transformers 5 reads "full_shard" as fsdp on, the sharding in fsdp_config
    assert args.fsdp_config["version"] == 2 and args.fsdp_config["reshard_after_forward"] is True
    assert args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config["finetuning_type"] == "full"  # FSDP shards full tuning; LoRA runs plain DDP
