"""Write a merged Llama-architecture model and its tokenizer as one GGUF file, in pure Python (`gguf` package).

What llama.cpp (and so Ollama and LM Studio) reads from the file, and where each value comes from:
  - tensors: HF names mapped to GGUF names (`token_embd`, `blk.N.attn_q`, ...); the q and k projections
    permuted from HF's rotate-half layout to the interleaved pairs llama.cpp's rope expects; 1-D tensors
    (the RMS norms) in f32; a tied output head is not duplicated (llama.cpp reuses `token_embd`).
  - types: every 2-D tensor in the chosen `export_quantization`, except the tensor that serves as the output
    head under q4_*/q5_*, kept at q8_0 (llama.cpp's quantizer keeps it at q8_0 or higher, as the output
    head is the tensor most sensitive to rounding); a row length that is not a multiple of the block size
    falls back to f16, as llama.cpp does.
  - hyperparameters: context length, widths, heads, rope base and dimension, RMS epsilon, vocab size.
  - tokenizer: the byte-level BPE vocab and merges (`tokenizer.ggml.model = gpt2`), the pre-tokenizer name
    llama.cpp implements for this vocab (`tokenizer.ggml.pre`, found as llama.cpp's converter finds it: a hash
    of the ids of a fixed check text), token types (special tokens are CONTROL), bos/unk/pad ids, the chat
    template used in training, and eos = eot = the end-of-turn token training taught the model to emit.

`check_gguf` reads a written file back with `gguf.GGUFReader` and refuses it when a serving runtime would not
stop on the end-of-turn token or would tokenize differently. K-quants (q4_k_m, ...) need llama.cpp's C++
quantizer and are not offered.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

QUANT_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
}
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
}
# Types under which the output head stays at q8_0 (what llama.cpp's quantizer does for these file types).
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")

# llama.cpp names its pre-tokenizers by the sha256 of str(tokenizer.encode(CHECK_TEXT)); this text and these
# hashes are the ones its converter uses (conversion/base.py, get_vocab_base_pre). A hash identifies the
# vocab and the pre-tokenizer together, so a fine-tune keeps its base model's entry.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # StarCoder2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",
}
# A tokenizer.json pre-tokenizer that is exactly GPT-2's regex split (and no normalizer) is llama.cpp's gpt-2
# pre-tokenizer whatever its vocab: the name says how text is split before BPE, not which vocab is used.
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}

LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass
class GGUFSummary:
    """What was written: the file, its size, the tensor types used and the tokens that end a turn."""

    path: Path
    quantization: str
    size_bytes: int
    tensor_types: dict[str, str]
    pre_tokenizer: str
    end_of_turn_id: int
    end_of_turn: str


def gguf_file_name(quantization: str) -> str:
    """The file name of an export in `quantization` (one file per type can sit in one export dir)."""
    return f"model-{quantization}.gguf"


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The `tokenizer.ggml.pre` value llama.cpp needs to split text as this tokenizer does.

    Raises:
        SftflowError: neither llama.cpp's hash of the check text nor the pre-tokenizer's structure is one
            llama.cpp implements.
    """
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    spec = _tokenizer_json(tokenizer)
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is None and {k: pre.get(k) for k in GPT2_PRE_TOKENIZER} == GPT2_PRE_TOKENIZER:
        return "gpt-2"
    raise SftflowError(
        f"this tokenizer's pre-tokenizer (hash {digest[:16]}..., {json.dumps(pre)[:120]}) is not one that "
        "sftflow knows llama.cpp implements, so llama.cpp would split text differently from training. "
        "Export to the HF format (export_format: hf) and convert with llama.cpp's convert_hf_to_gguf.py, which "
        "lists more tokenizers."
    )


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SftflowError(
            "GGUF export needs a fast (tokenizers-backed) BPE tokenizer; this one has no tokenizer.json."
        )
    return json.loads(backend.to_str())


def vocab_for_gguf(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> tuple[list[str], list[int], list[str]]:
    """Tokens (by id, `vocab_size` of them), their GGUF token types, and the BPE merges as "a b" strings.

    Ids the tokenizer lacks (an embedding padded past the vocab) become unused `[PADn]` tokens; added
    tokens are CONTROL when special, USER_DEFINED otherwise, and stored as their raw text.

    Raises:
        SftflowError: not a byte-level BPE tokenizer, or more tokens than embedding rows.
    """
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise SftflowError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style: Llama 3, SmolLM, Qwen); this one is "
            f"{model.get('type')} with decoder {json.dumps(spec.get('decoder'))[:80]}. Export to the HF format "
            "and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise SftflowError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has {vocab_size} rows."
        )
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            types[i] = int(gguf.TokenType.CONTROL if added[text].special else gguf.TokenType.USER_DEFINED)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def permute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection from HF's rotate-half rope layout (each head's first half of
    dimensions paired with its second half) to the interleaved pairs (0,1), (2,3), ... of llama.cpp."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama_tensors(
    state_dict: dict[str, torch.Tensor], config: PretrainedConfig
) -> list[tuple[str, np.ndarray]]:
    """The model's tensors under their GGUF names, as fp32 numpy arrays, q/k permuted for llama.cpp.

    Raises:
        SftflowError: a tensor this writer does not know (biases, extra modules): it would be dropped.
    """
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: list[tuple[str, np.ndarray]] = []
    for hf_name, tensor in state_dict.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and tied):
            continue
        if hf_name in GLOBAL_TENSORS:
            name = GLOBAL_TENSORS[hf_name]
        else:
            parts = hf_name.split(".", 3)  # model, layers, N, rest
            if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in LAYER_TENSORS:
                raise SftflowError(
                    f"GGUF export does not know the tensor {hf_name!r} (biases and extra modules are not "
                    "supported); export to the HF format and convert with llama.cpp's convert_hf_to_gguf.py."
                )
            name = f"blk.{int(parts[2])}.{LAYER_TENSORS[parts[3]]}"
        data = tensor.detach().to("cpu").float().numpy()
        if name.endswith("attn_q.weight"):
            data = permute_for_rope(data, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = permute_for_rope(data, config.num_key_value_heads)
        out.append((name, np.ascontiguousarray(data)))
    return out


def tensor_type(
    name: str, shape: tuple[int, ...], quantization: str, tied: bool
) -> gguf.GGMLQuantizationType:
    """The GGUF type of one tensor in an export of type `quantization` (see the module docstring)."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    qtype = QUANT_TYPES[quantization]
    is_head = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_head and quantization in LOW_BIT:
        qtype = gguf.GGMLQuantizationType.Q8_0
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        return gguf.GGMLQuantizationType.F16
    return qtype


def check_supported(config: PretrainedConfig) -> None:
    """Refuse a checkpoint this writer cannot express exactly.

    Raises:
        SftflowError: not a Llama model, biases, a non-SiLU activation, or rope scaling other than linear.
    """
    fix = "export to the HF format (export_format: hf) and convert it with llama.cpp's convert_hf_to_gguf.py"
    if getattr(config, "model_type", None) != "llama":
        raise SftflowError(
            f"GGUF export supports Llama-architecture models (SmolLM, Llama, TinyLlama); this one is "
            f"{getattr(config, 'model_type', None)!r}: {fix}."
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise SftflowError(f"GGUF export does not write attention/MLP biases: {fix}.")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise SftflowError(f"GGUF export of llama needs hidden_act silu, got {config.hidden_act}: {fix}.")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise SftflowError(f"GGUF export does not write rope scaling {rope.get('rope_type')!r}: {fix}.")


def _rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    quantization: str,
    end_of_turn_id: int,
    name: str,
) -> GGUFSummary:
    """Write `model` (a merged LlamaForCausalLM) and `tokenizer` to `path` as a GGUF of type `quantization`.

    Args:
        model: the merged model; its weights are read in fp32 whatever their dtype.
        tokenizer: the tokenizer used in training, with its chat template.
        path: the .gguf file to write.
        quantization: a key of QUANT_TYPES.
        end_of_turn_id: the token training taught the model to end an answer with; written as eos and eot.
        name: `general.name`.

    Returns:
        A summary of the file (`check_gguf` then proves it).

    Raises:
        SftflowError: an unsupported architecture, tokenizer or tensor, or an unknown quantization.
    """
    if quantization not in QUANT_TYPES:
        raise SftflowError(
            f"export_quantization must be one of {', '.join(QUANT_TYPES)}, got {quantization!r}."
        )
    config = model.config
    check_supported(config)
    pre = pre_tokenizer_name(tokenizer)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    tokens, types, merges = vocab_for_gguf(tokenizer, vocab_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope_parameters(config)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_file_type(int(FILE_TYPES[quantization]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token is not None:
            add(int(token))
    writer.add_eos_token_id(end_of_turn_id)
    writer.add_eot_token_id(end_of_turn_id)
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    tensor_types: dict[str, str] = {}
    for tensor_name, data in llama_tensors(model.state_dict(), config):
        qtype = tensor_type(tensor_name, data.shape, quantization, tied)
        tensor_types[tensor_name] = qtype.name
        writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFSummary(
        path=path,
        quantization=quantization,
        size_bytes=path.stat().st_size,
        tensor_types=tensor_types,
        pre_tokenizer=pre,
        end_of_turn_id=end_of_turn_id,
        end_of_turn=tokens[end_of_turn_id],
    )


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding text prepends bos (llama.cpp's add_bos_token must do the same)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer.encode("a")
    return (
        bool(ids)
        and ids[0] == tokenizer.bos_token_id
        and ids != tokenizer.encode("a", add_special_tokens=False)
    )


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (strings, numbers, and lists of them), read with GGUFReader."""
    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    meta["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


def check_gguf(summary: GGUFSummary, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Read the written file back and prove a runtime would tokenize like training and stop on its end of turn.

    Returns:
        The file's metadata (see `read_gguf_metadata`).

    Raises:
        SftflowError: with the first reason the file would not stop or would be read differently.
    """
    meta = read_gguf_metadata(summary.path)
    eot = summary.end_of_turn_id
    tokens = meta.get("tokenizer.ggml.tokens") or []
    problems = []
    if meta.get("tokenizer.ggml.eos_token_id") != eot or meta.get("tokenizer.ggml.eot_token_id") != eot:
        problems.append(
            f"eos/eot ids are {meta.get('tokenizer.ggml.eos_token_id')}/{meta.get('tokenizer.ggml.eot_token_id')}, "
            f"not the end-of-turn token {eot}"
        )
    if eot >= len(tokens) or tokens[eot] != tokenizer.convert_ids_to_tokens(eot):
        problems.append(f"token {eot} is not {tokenizer.convert_ids_to_tokens(eot)!r} in the GGUF vocab")
    elif meta["tokenizer.ggml.token_type"][eot] != int(gguf.TokenType.CONTROL):
        problems.append(
            f"the end-of-turn token {tokens[eot]!r} is not a control token, so it would print as text"
        )
    if meta.get("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("the chat template differs from the tokenizer's")
    if meta.get("tokenizer.ggml.pre") != summary.pre_tokenizer:
        problems.append(f"tokenizer.ggml.pre is {meta.get('tokenizer.ggml.pre')!r}")
    if meta.get("tensor_types") != summary.tensor_types:
        problems.append("the tensor types read back differ from those written")
    if problems:
        raise SftflowError(f"refusing the GGUF export {summary.path}: " + "; ".join(problems) + ".")
    return meta


def top1_predictions(model: PreTrainedModel, sequences: list[tuple[list[int], list[int]]]) -> list[Any]:
    """The model's most likely next token at the trained (answer) positions of each sequence, teacher-forced.

    Args:
        model: a causal LM (the merged HF model, or a GGUF loaded back with transformers).
        sequences: (input_ids, labels) pairs; positions whose label is -100 are not scored.

    Returns:
        One tensor of predicted ids per sequence, one id per scored position.
    """
    import torch

    predictions = []
    with torch.no_grad():
        for ids, labels in sequences:
            scored = torch.tensor(labels[1:]) != -100
            predictions.append(model(torch.tensor([ids])).logits[0, :-1].argmax(-1)[scored])
    return predictions


def top1_agreement(reference: list[Any], candidate: list[Any]) -> float:
    """The share of scored positions where two models' `top1_predictions` are the same token."""
    agree = sum(int((a == b).sum()) for a, b in zip(reference, candidate, strict=True))
    total = sum(len(a) for a in reference)
    return agree / total if total else float("nan")
