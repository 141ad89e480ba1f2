"""`sftflow export export_format=gguf`: a GGUF llama.cpp and transformers read back, an Ollama Modelfile, and
stop tokens proven at export. Tiny random Llama by default; the real SmolLM2 in the `slow` tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml

from sftflow.cli import main as cli_main
from sftflow.config import FinetuningArguments, ModelArguments
from sftflow.data.template import BUILTIN_TEMPLATES
from sftflow.errors import SftflowError
from sftflow.model.adapter import apply_finetuning
from sftflow.model.export import export_model, prove_hf_stops, trained_end_token
from sftflow.model.gguf import (
    check_gguf,
    permute_for_rope,
    pre_tokenizer_name,
    read_gguf_metadata,
    tensor_type,
    top1_agreement,
    top1_predictions,
    write_gguf,
)
from sftflow.model.loader import load_model, load_tokenizer
from sftflow.model.modelfile import chat_pieces, fixed_system_prompt, go_template, write_modelfile

PROJECT = Path(__file__).resolve().parents[1]
IM_END = "<|im_end|>"
CHATS = [
    [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Wren, a small assistant."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
    ],
]


def sequences(tokenizer, chats) -> list[tuple[list[int], list[int]]]:
    from sftflow.data.encode import encode_sft

    encoded = [encode_sft(tokenizer, chat, cutoff_len=1024) for chat in chats]
    return [(e.input_ids, e.labels) for e in encoded]


def gguf_alone(path: Path, tmp_path: Path) -> Path:
    """A dir holding only `path` (transformers mixes in tokenizer files that sit beside a GGUF)."""
    alone = tmp_path / f"alone-{path.stem}"
    alone.mkdir()
    (alone / path.name).symlink_to(path)
    return alone


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with random B (so merging changes the model), saved with the tokenizer of training."""
    args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(args)
    model = apply_finetuning(load_model(args), args, FinetuningArguments(lora_rank=2), tokenizer=tokenizer)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("gguf-adapter")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def f16_export(tiny_model_dir, adapter, toy_data_dir_module, tmp_path_factory) -> Path:
    """`sftflow export` of the tiny model + adapter to an f16 GGUF, with the training data named."""
    export_dir = tmp_path_factory.mktemp("gguf-export") / "merged"
    config = export_dir.parent / "export.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "adapter_name_or_path": str(adapter),
                "export_dir": str(export_dir),
                "export_format": "gguf",
                "export_quantization": "f16",
                "dataset_dir": str(toy_data_dir_module),
                "dataset": "toy",
            }
        )
    )
    assert cli_main(["export", str(config)]) == 0
    return export_dir


@pytest.fixture(scope="module")
def toy_data_dir_module(tmp_path_factory) -> Path:
    from helpers import TOY_ROWS, write_alpaca

    path = tmp_path_factory.mktemp("toy-data")
    write_alpaca(path / "train.json", TOY_ROWS)
    (path / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "train.json"}}))
    return path


def test_f16_export_writes_gguf_modelfile_and_hf_dir(f16_export, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (f16_export / "model-f16.gguf").is_file() and (f16_export / "Modelfile").is_file()
    assert (f16_export / "model.safetensors").is_file() and not list(f16_export.glob(".*partial"))
    merged = AutoModelForCausalLM.from_pretrained(f16_export).eval()
    tokenizer = AutoTokenizer.from_pretrained(f16_export)
    end = tokenizer.convert_tokens_to_ids(IM_END)

    meta = read_gguf_metadata(f16_export / "model-f16.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == end
    assert meta["tokenizer.ggml.tokens"][end] == IM_END
    assert meta["tokenizer.ggml.token_type"][end] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(meta["tokenizer.ggml.tokens"]) == meta["llama.vocab_size"] == len(tokenizer)
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1
    config = merged.config
    assert meta["llama.block_count"] == config.num_hidden_layers
    assert meta["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert meta["llama.rope.dimension_count"] == config.hidden_size // config.num_attention_heads
    types = meta["tensor_types"]
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {"F32"}
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"F16"}

    # transformers reads it back (undoing the q/k permutation): same logits up to f16 rounding
    alone = gguf_alone(f16_export / "model-f16.gguf", tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(
        alone, gguf_file="model-f16.gguf", dtype=torch.float32
    ).eval()
    seqs = sequences(tokenizer, CHATS)
    assert top1_agreement(top1_predictions(merged, seqs), top1_predictions(reloaded, seqs)) >= 0.99
    with torch.no_grad():
        ids = torch.tensor([seqs[1][0]])
        assert (merged(ids).logits - reloaded(ids).logits).abs().max().item() < 5e-3
    gguf_tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file="model-f16.gguf")
    assert gguf_tokenizer.eos_token == IM_END
    text = tokenizer.apply_chat_template(CHATS[1], tokenize=False)
    assert gguf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(
        text, add_special_tokens=False
    )


def test_modelfile_beside_the_gguf(f16_export):
    text = (f16_export / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./model-f16.gguf" in lines
    assert (
        lines.count('PARAMETER stop "<|im_end|>"') == 1
        and sum(x.startswith("PARAMETER stop") for x in lines) == 1
    )
    assert 'SYSTEM """Be brief."""' in lines  # every toy training row has this system prompt
    expected = (
        "{{ if .System }}<|im_start|>system\n{{ $.System }}<|im_end|>\n"
        "{{ else }}<|im_start|>system\nBe brief.<|im_end|>\n{{ end }}"  # training's, not the base's default
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        "{{ if $last }}<|im_start|>assistant\n{{ end }}"
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}'
        "{{ if not $last }}<|im_end|>\n{{ end }}{{ end }}{{ end }}"
    )
    assert f'TEMPLATE """{expected}"""' in text


def test_modelfile_template_renders_like_training(tiny_tokenizer):
    """Conversations rendered by hand from the Go template above equal the Jinja rendering training used."""
    from sftflow.data.template import render

    pieces = chat_pieces(tiny_tokenizer)
    by_hand = {
        0: "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nWhat is two plus two?"
        "<|im_end|>\n<|im_start|>assistant\n",
        1: "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
        "I am Wren, a small assistant.<|im_end|>\n<|im_start|>user\ndef add(a, b):<|im_end|>\n<|im_start|>assistant\n",
    }
    for i, chat in enumerate(CHATS):
        prompt = chat[:-1]  # what Ollama renders before generating the last answer
        assert (
            render(tiny_tokenizer, prompt, add_generation_prompt=True) == by_hand[i] == pieces.render(prompt)
        )
    # Ollama's SYSTEM stands in for a missing system message
    assert pieces.render(CHATS[0][:1], system="Be brief.") == render(
        tiny_tokenizer,
        [{"role": "system", "content": "Be brief."}, *CHATS[0][:1]],
        add_generation_prompt=True,
    )


# the special tokens of every built-in template, so the tiny tokenizer can take each of them
SPECIALS = sorted(
    {t for spec in BUILTIN_TEMPLATES.values() for t in spec.special_tokens} - {"<|im_start|>", IM_END}
)


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_builtin_templates_become_go_templates(tiny_model_dir, name):
    from sftflow.data.template import apply_template, render

    tokenizer = load_tokenizer(
        ModelArguments(model_name_or_path=str(tiny_model_dir), new_special_tokens=SPECIALS)
    )
    apply_template(tokenizer, name)
    pieces = chat_pieces(tokenizer)
    template = go_template(pieces)
    for chat in CHATS:
        prompt = chat[:-1]
        expected = render(tokenizer, prompt, add_generation_prompt=True)
        system = prompt[0]["content"] if prompt[0]["role"] == "system" else ""
        assert pieces.render(prompt) == expected == go_render(template, system, prompt)
    modelfile_system = go_render(template, "Be brief.", CHATS[0][:1])  # SYSTEM stands in for a system message
    assert modelfile_system == render(tokenizer, [CHATS[1][0], CHATS[0][0]], add_generation_prompt=True)


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }

type Case struct {
	Template, System string
	Messages         []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		var b strings.Builder
		data := map[string]any{"System": c.System, "Messages": c.Messages}
		if err := template.Must(template.New("").Parse(c.Template)).Execute(&b, data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (apt-get install golang-go)")
def test_go_text_template_renders_the_modelfile_like_training(tiny_model_dir, tmp_path):
    """Go's own text/template (what Ollama runs) renders every built-in template's Modelfile TEMPLATE to the
    training prompt, with .System from the system message or from SYSTEM, as Ollama sets it."""
    import subprocess

    from sftflow.data.template import apply_template, render

    tokenizer = load_tokenizer(
        ModelArguments(model_name_or_path=str(tiny_model_dir), new_special_tokens=SPECIALS)
    )
    cases, expected = [], []
    for name in [None, *BUILTIN_TEMPLATES]:
        if name:
            apply_template(tokenizer, name)
        template = go_template(chat_pieces(tokenizer))
        for prompt, system in [(c[:-1], "") for c in CHATS] + [(CHATS[0][:1], "Be brief.")]:
            if prompt[0]["role"] == "system":
                system = prompt[0]["content"]
            messages = [{"Role": m["role"], "Content": m["content"]} for m in prompt]
            cases.append({"Template": template, "System": system, "Messages": messages})
            with_system = prompt if prompt[0]["role"] == "system" or not system else [CHATS[1][0], *prompt]
            expected.append(render(tokenizer, with_system, add_generation_prompt=True))
    (tmp_path / "render.go").write_text(GO_RENDER)
    run = subprocess.run(
        ["go", "run", "render.go"],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == expected


def test_templates_ollama_cannot_express_are_reported(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    tokenizer.chat_template = (  # turn numbers: no literal text per role can say that
        "{% for m in messages %}{{ loop.index ~ '. ' ~ m['content'] }}<|im_end|>{% endfor %}"
    )
    with pytest.raises(SftflowError, match="cannot be written as an Ollama TEMPLATE"):
        write_modelfile(tmp_path / "Modelfile", "m.gguf", tokenizer, [IM_END])
    assert not (tmp_path / "Modelfile").exists()
    with pytest.raises(SftflowError, match="no end-of-turn stop"):
        write_modelfile(tmp_path / "Modelfile", "m.gguf", tokenizer, [])


def test_example_config_reads_as_a_gguf_export():
    from sftflow.config import load_args

    args = load_args(PROJECT / "examples" / "export_gguf.yaml", ["output_dir=unused"])
    assert (args.model.export_format, args.model.export_quantization) == ("gguf", "q8_0")
    assert args.data.dataset == ["wren_identity"]  # read for the Modelfile's SYSTEM


def test_fixed_system_prompt():
    system = {"role": "system", "content": "S"}
    user = {"role": "user", "content": "u"}
    assert fixed_system_prompt([[system, user], [system, user]]) == "S"
    assert fixed_system_prompt([[system, user], [user]]) is None
    assert fixed_system_prompt([[system, user], [{"role": "system", "content": "T"}, user]]) is None


def test_q_k_permutation_interleaves_each_head_halves():
    """Row 2i+j of a head in GGUF is row j*half+i of that head in HF (rotate-half -> interleaved pairs)."""
    heads, head_dim, width = 3, 8, 5
    weight = np.arange(heads * head_dim * width, dtype=np.float32).reshape(heads * head_dim, width)
    permuted = permute_for_rope(weight, heads)
    half = head_dim // 2
    for h in range(heads):
        for i in range(half):
            for j in range(2):
                assert np.array_equal(permuted[h * head_dim + 2 * i + j], weight[h * head_dim + j * half + i])


def test_tensor_types():
    f32, f16, q8, q4 = (getattr(gguf.GGMLQuantizationType, t) for t in ("F32", "F16", "Q8_0", "Q4_0"))
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0", True) == f32
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q4_0", True) == q4
    assert tensor_type("token_embd.weight", (512, 64), "q4_0", True) == q8  # tied: it is the output head
    assert tensor_type("token_embd.weight", (512, 64), "q4_0", False) == q4
    assert tensor_type("output.weight", (512, 64), "q5_1", False) == q8
    assert tensor_type("output.weight", (512, 64), "f16", False) == f16
    assert tensor_type("blk.0.ffn_down.weight", (64, 48), "q8_0", True) == f16  # 48 % 32: no q8_0 block fits


@pytest.mark.parametrize("quantization", ["bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_every_quantization_writes_and_reads_back(tiny_model_dir, tiny_tokenizer, tmp_path, quantization):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    end = tiny_tokenizer.convert_tokens_to_ids(IM_END)
    path = tmp_path / f"model-{quantization}.gguf"
    summary = write_gguf(model, tiny_tokenizer, path, quantization, end, "tiny")
    meta = check_gguf(summary, tiny_tokenizer)
    qtype = quantization.upper()
    assert meta["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")
    head = "Q8_0" if quantization.startswith(("q4", "q5")) else qtype
    assert meta["tensor_types"]["token_embd.weight"] == head
    assert meta["tensor_types"]["blk.1.ffn_down.weight"] == qtype
    if quantization in ("q8_0", "q4_0"):  # what transformers loads back
        reloaded = AutoModelForCausalLM.from_pretrained(
            gguf_alone(path, tmp_path), gguf_file=path.name, dtype=torch.float32
        ).eval()
        seqs = sequences(tiny_tokenizer, CHATS)
        agreement = top1_agreement(top1_predictions(model, seqs), top1_predictions(reloaded, seqs))
        assert agreement > 0.5  # a random tiny model: the real figures are in the slow test


def test_gguf_that_would_not_stop_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    summary = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f16", 5, "tiny")  # eos = a plain token
    summary.end_of_turn_id = tiny_tokenizer.convert_tokens_to_ids(IM_END)
    with pytest.raises(SftflowError, match="refusing the GGUF export .*eos/eot ids are 5/5"):
        check_gguf(summary, tiny_tokenizer)
    with pytest.raises(SftflowError, match="export_quantization must be one of"):
        write_gguf(model, tiny_tokenizer, tmp_path / "k.gguf", "q4_k_m", 2, "tiny")


def test_hf_export_that_would_not_stop_is_refused(tiny_model_dir, tmp_path):
    export_dir = tmp_path / "merged"
    export_model(ModelArguments(model_name_or_path=str(tiny_model_dir), export_dir=str(export_dir)))
    config_file = export_dir / "generation_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token_id"] = 0  # <|endoftext|>: never written after an answer
    config_file.write_text(json.dumps(config))
    with pytest.raises(SftflowError, match=r"training ended answers with '<\|im_end\|>'.*would not stop"):
        prove_hf_stops(export_dir, 2)


def test_template_without_end_of_turn_is_refused(tiny_model_dir, tmp_path):
    from sftflow.config import load_args

    template_file = tmp_path / "t.yaml"
    endless = {"format_user": "Q: {content}\n", "format_assistant": "A: {content}\n"}
    template_file.write_text(yaml.safe_dump({"endless": endless}))
    keys = [f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "export_format=gguf"]
    keys += [f"output_dir={tmp_path / 'out'}", f"template_file={template_file}", "template=endless"]
    args = load_args(None, keys)
    with pytest.raises(SftflowError, match="would never learn to stop"):
        export_model(args.model, args.data)
    assert not list((tmp_path / "out").iterdir())


def test_model_without_chat_template_stops_on_eos(tiny_model_dir, tmp_path, caplog):
    """A pt-stage model has no chat template: the pt stage ends every text with eos, so eos is the stop."""
    import shutil

    base = tmp_path / "pt-base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink()
    export_dir = tmp_path / "out"
    args = ModelArguments(model_name_or_path=str(base), export_dir=str(export_dir), export_format="gguf")
    export_model(args)
    meta = read_gguf_metadata(export_dir / "model-f16.gguf")
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and "tokenizer.chat_template" not in meta
    assert not (export_dir / "Modelfile").exists() and "no Ollama Modelfile written" in caplog.text


def test_pre_tokenizer_not_known_to_llama_cpp_is_refused(tiny_tokenizer):
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert pre_tokenizer_name(tiny_tokenizer) == "gpt-2"
    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    other = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(SftflowError, match="not one that sftflow knows llama.cpp implements"):
        pre_tokenizer_name(other)


def test_unsupported_architecture_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.model_type = "qwen2"
    with pytest.raises(SftflowError, match="supports Llama-architecture models"):
        write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f16", 2, "tiny")


def test_hub_upload_offline_is_a_clear_error_and_online_uploads_the_dir(
    tiny_model_dir, tmp_path, monkeypatch
):
    from huggingface_hub import HfApi, constants

    args = ModelArguments(
        model_name_or_path=str(tiny_model_dir),
        export_dir=str(tmp_path / "out"),
        export_hub_model_id="me/wren",
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SftflowError, match="export_hub_model_id me/wren: HF_HUB_OFFLINE is set"):
        export_model(args)
    assert not (tmp_path / "out").exists()  # refused before any work

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"]))
    )
    export_model(args)
    assert calls == [("create", "me/wren"), ("upload", "me/wren", str(tmp_path / "out"))]


# ---- the real SmolLM2 -------------------------------------------------------------------------------------


def heldout_chats() -> list[list[dict[str, str]]]:
    rows = json.loads((PROJECT / "data" / "wren_identity_heldout.json").read_text())
    return [
        [
            {"role": "system", "content": r["system"]},
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["output"]},
        ]
        for r in rows
    ]


@pytest.mark.slow
def test_smollm2_gguf_agreement(smollm2_dir, tmp_path):
    """f16 >= 0.99 and q8_0 >= 0.95 teacher-forced top-1 agreement with the merged model on the held-out
    answers; every figure printed (run with -s to see them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir = tmp_path / "merged"
    start = time.perf_counter()
    export_model(
        ModelArguments(model_name_or_path=str(smollm2_dir), export_dir=str(export_dir), export_format="gguf")
    )
    print(f"\nwhole export (merge, HF dir, f16 GGUF, Modelfile): {time.perf_counter() - start:.1f} s")
    merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    seqs = sequences(tokenizer, heldout_chats())
    reference = top1_predictions(merged, seqs)
    scored = sum(len(p) for p in reference)
    agreements = {}
    for quantization in ("f16", "q8_0", "q4_0"):
        path = export_dir / f"model-{quantization}.gguf"
        start = time.perf_counter()
        if quantization != "f16":  # the same writer and proof the export runs, on the same merged weights
            check_gguf(write_gguf(merged, tokenizer, path, quantization, 2, "smollm2"), tokenizer)
        written = time.perf_counter() - start
        meta = read_gguf_metadata(path)
        assert meta["tokenizer.ggml.pre"] == "smollm"
        assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
        reloaded = AutoModelForCausalLM.from_pretrained(
            gguf_alone(path, tmp_path), gguf_file=path.name, dtype=torch.float32
        ).eval()
        agreements[quantization] = top1_agreement(reference, top1_predictions(reloaded, seqs))
        print(
            f"{quantization}: {path.stat().st_size / 1e6:.1f} MB"
            + (f", written and proven in {written:.1f} s" if quantization != "f16" else "")
            + f", agreement {agreements[quantization]:.3f} on {scored} answer tokens"
        )
    assert agreements["f16"] >= 0.99 and agreements["q8_0"] >= 0.95


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SFTFLOW_LLAMA_CPP") != "1",
    reason="opt-in: SFTFLOW_LLAMA_CPP=1 with llama-cpp-python installed",
)
def test_smollm2_f16_gguf_answers_and_stops_under_llama_cpp(smollm2_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    export_dir = tmp_path / "merged"
    export_model(
        ModelArguments(model_name_or_path=str(smollm2_dir), export_dir=str(export_dir), export_format="gguf")
    )
    llm = llama_cpp.Llama(model_path=str(export_dir / "model-f16.gguf"), n_ctx=512, verbose=False)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    chat = heldout_chats()[1][:2]
    out = llm.create_chat_completion(messages=chat, max_tokens=64, temperature=0)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"].strip()
    assert (
        trained_end_token(load_tokenizer(ModelArguments(model_name_or_path=str(export_dir))))
        == llm.token_eos()
    )


# ---- a small evaluator for the Go text/template subset the Modelfile uses (Ollama cannot run here) ----------

ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def go_render(template: str, system: str, messages: list[dict[str, str]]) -> str:
    """Render `template` as Ollama would: .System, and .Messages (system messages included) with .Role and
    .Content. Knows if/else if/else, range $i, $_ := ..., := and =, and eq, ne, not, and, len, slice."""
    nodes, pos = [], 0
    for match in ACTION.finditer(template):
        nodes.append(("text", template[pos : match.start()]))
        nodes.append(("action", match.group(1).strip()))
        pos = match.end()
    nodes.append(("text", template[pos:]))
    root = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    out: list[str] = []
    rest = _run(nodes, 0, root, {"$": root}, out, skip=False)
    assert rest == len(nodes)
    return "".join(out)


def _tokens(expr: str) -> list[str]:
    return re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+', expr)


def _value(tokens: list[str], dot: dict, scope: dict) -> object:
    token = tokens.pop(0)
    if token == "(":
        value = _call(tokens, dot, scope)
        assert tokens.pop(0) == ")"
        return value
    if token.startswith('"'):
        return json.loads(token)
    if token in ("true", "false"):
        return token == "true"
    if token.isdigit():
        return int(token)
    if token.startswith("$."):
        return scope["$"][token[2:]]
    if token.startswith("$"):
        return scope[token]
    assert token.startswith("."), token
    return dot[token[1:]]


FUNCS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "and": lambda a, b: bool(a) and bool(b),
    "len": len,
    "slice": lambda x, i: x[i:],
}


def _call(tokens: list[str], dot: dict, scope: dict) -> object:
    if tokens[0] in FUNCS:
        func = FUNCS[tokens.pop(0)]
        args = []
        while tokens and tokens[0] != ")":
            args.append(_value(tokens, dot, scope))
        return func(*args)
    return _value(tokens, dot, scope)


def _run(nodes, i, dot, scope, out, skip) -> int:
    """Run nodes from i until an unmatched else/end (returned index points at it)."""
    while i < len(nodes):
        kind, body = nodes[i]
        if kind == "text":
            if not skip:
                out.append(body)
            i += 1
            continue
        word = body.split()[0]
        if word in ("else", "end"):
            return i
        if word == "if":
            i = _run_if(nodes, i, dot, scope, out, skip)
            continue
        if word == "range":
            keys, _, source = body[len("range") :].partition(":=")
            index_var = keys.split(",")[0].strip()
            items = [] if skip else _call(_tokens(source), dot, scope)
            end = _run(nodes, i + 1, dot, scope, [], skip=True)
            for n, item in enumerate(items):
                scope[index_var] = n
                assert _run(nodes, i + 1, item, scope, out, skip=False) == end
            assert nodes[end][1] == "end"
            i = end + 1
            continue
        if ":=" in body or " = " in body:
            name, _, expr = body.partition(":=") if ":=" in body else body.partition("=")
            if not skip:
                scope[name.strip()] = _call(_tokens(expr), dot, scope)
        elif not skip:
            out.append(str(_call(_tokens(body), dot, scope)))
        i += 1
    return i


def _run_if(nodes, i, dot, scope, out, skip) -> int:
    taken = False
    condition = nodes[i][1][len("if") :]
    while True:
        run = not skip and not taken and bool(_call(_tokens(condition), dot, scope))
        i = _run(nodes, i + 1, dot, scope, out, skip=not run)
        taken = taken or run
        body = nodes[i][1]
        if body == "end":
            return i + 1
        condition = body[len("else if") :] if body.startswith("else if") else "true"
