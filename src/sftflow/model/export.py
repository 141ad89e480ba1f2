"""`sftflow export CONFIG`: merge LoRA adapter(s) into the base model and write a standard HF model dir.

The dir holds safetensors shards (at most `export_size` GB each), config.json, generation_config.json
(stopping at the chat template's end-of-turn token) and the tokenizer with its chat template, so
`AutoModelForCausalLM.from_pretrained(export_dir)` loads it with no sftflow installed. Keys are
LLaMA-Factory's: model_name_or_path, adapter_name_or_path (comma-separated to stack several),
export_dir, export_size, template.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from sftflow.config import DataArguments, ModelArguments

logger = logging.getLogger(__name__)

USAGE = """usage: sftflow export CONFIG.yaml [key=value ...]

Merge LoRA adapter(s) into the base model and write a standard Hugging Face model dir.

  model_name_or_path    the base model (HF dir, hub id, .gguf file or bundled name); not quantized
  adapter_name_or_path  adapter dir(s) to merge, comma-separated to stack several (in that order)
  export_dir            where to write the merged model (required)
  export_size           max GB per safetensors shard (default 5)
  dtype                 dtype of the written weights (default auto: the base checkpoint's own dtype)
  template              chat template to save with the tokenizer (default: the adapter's tokenizer, else the base's)
  new_special_tokens    tokens added at training time, if the adapter dir has no tokenizer
  overwrite_output_dir  allow writing into a non-empty export_dir

`sftflow train --help` lists every key."""


def main(argv: list[str]) -> int:
    """The `sftflow export` command."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from sftflow.cli import setup_logging, split_config_and_overrides
    from sftflow.config import load_args
    from sftflow.config.parser import parse_overrides, read_config_file

    config, overrides = split_config_and_overrides(argv)
    raw = read_config_file(config) if config else {}
    raw.update(parse_overrides(overrides))
    if not raw.get("export_dir"):
        raise SftflowError("export_dir is required (e.g. export_dir: saves/merged).")
    if not raw.get("output_dir"):  # a training key load_args requires; export writes only to export_dir
        overrides = [*overrides, f"output_dir={raw['export_dir']}"]
    args = load_args(config, overrides)
    setup_logging()
    export_dir = export_model(args.model, args.data, overwrite=args.finetuning.overwrite_output_dir)
    print(f"sftflow: exported the merged model to {export_dir.resolve()}", flush=True)
    print(f"  load it with AutoModelForCausalLM.from_pretrained({str(export_dir)!r})", flush=True)
    return 0


def export_model(
    model_args: ModelArguments, data_args: DataArguments | None = None, overwrite: bool = False
) -> Path:
    """Merge `adapter_name_or_path` into `model_name_or_path` and save the result to `export_dir`.

    The merge runs in fp32 on CPU (exact for any base dtype); the weights are then written in `dtype`,
    or with `dtype: auto` in the base checkpoint's own dtype.

    Args:
        model_args: model, adapters, export_dir, export_size, dtype.
        data_args: its `template` (and `template_file`, when set) replace the saved chat template.
        overwrite: allow a non-empty export_dir (its old weight files are removed first).

    Returns:
        The export dir.

    Raises:
        SftflowError: no export_dir, a quantized base, invalid adapters, or a non-empty export_dir.
    """

    from sftflow.data.processor import stop_token_ids
    from sftflow.model.adapter import adapter_paths, check_adapter_dir, merge_adapters
    from sftflow.model.loader import is_quantized, load_model, model_path, resolve_dtype

    if not model_args.export_dir:
        raise SftflowError("export_dir is required (e.g. export_dir: saves/merged).")
    if model_args.quantization_bit is not None:
        raise SftflowError(
            "export merges adapters into full-precision weights and cannot merge into a quantized base: "
            "remove quantization_bit (the adapter of a QLoRA run merges into the unquantized base)."
        )
    base = model_path(model_args)
    if is_quantized(base):
        raise SftflowError(
            f"model_name_or_path {base} holds quantized weights (config.json has a quantization_config); "
            "merging into them would be lossy. Point model_name_or_path at the unquantized model."
        )
    export_dir = Path(model_args.export_dir).expanduser()
    _prepare_export_dir(export_dir, overwrite)
    allow_pickle = not model_args.use_safetensors
    paths = adapter_paths(model_args.adapter_name_or_path)
    for path in paths:
        check_adapter_dir(path, allow_pickle)

    tokenizer = _export_tokenizer(model_args, paths, data_args)
    merge_args = dataclasses.replace(model_args, dtype="float32")
    model = load_model(merge_args, tokenizer)
    if is_quantized(model):
        raise SftflowError(
            f"model_name_or_path {base} loaded as a quantized model; export needs full precision."
        )
    model = merge_adapters(model, paths, allow_pickle)

    out_dtype = resolve_dtype(model_args.dtype) if model_args.dtype != "auto" else _checkpoint_dtype(base)
    model.to(out_dtype)
    model.config.use_cache = True  # training runs turn it off; generation wants it
    stops = sorted(stop_token_ids(tokenizer) | _as_set(model.generation_config.eos_token_id))
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(export_dir, max_shard_size=int(model_args.export_size * 10**9))
    tokenizer.save_pretrained(export_dir)
    shards = sorted(p.name for p in export_dir.glob("*.safetensors"))
    logger.info(
        "wrote %s: %d safetensors file(s), %s, %d adapter(s) merged, eos %s",
        export_dir,
        len(shards),
        str(out_dtype).replace("torch.", ""),
        len(paths),
        stops,
    )
    return export_dir


def _prepare_export_dir(export_dir: Path, overwrite: bool) -> None:
    if export_dir.is_dir() and any(export_dir.iterdir()):
        if not overwrite:
            raise SftflowError(
                f"export_dir {export_dir} already holds files. Set overwrite_output_dir: true to replace them, or "
                "choose another export_dir."
            )
        # stale shards from a bigger earlier export would sit beside the new index
        for old in [*export_dir.glob("*.safetensors"), *export_dir.glob("*.safetensors.index.json")]:
            old.unlink()
    export_dir.mkdir(parents=True, exist_ok=True)


def _export_tokenizer(model_args: ModelArguments, paths: list[str], data_args: DataArguments | None) -> Any:
    """The tokenizer saved with the last adapter (it carries the chat template and tokens used in
    training), else the base model's; `template` from the config replaces the chat template."""
    from sftflow.data.template import apply_template
    from sftflow.model.loader import load_tokenizer

    source = None
    if paths and (Path(paths[-1]).expanduser() / "tokenizer_config.json").is_file():
        source = str(Path(paths[-1]).expanduser())
        logger.info("using the tokenizer saved with the adapter %s", paths[-1])
    tokenizer = load_tokenizer(model_args, source=source)
    template = getattr(data_args, "template", None)
    template_file = getattr(data_args, "template_file", None)
    if template_file:
        apply_template(tokenizer, template, template_file)
    elif template:
        apply_template(tokenizer, template)
    return tokenizer


def _checkpoint_dtype(path: str) -> Any:
    """The dtype a checkpoint was saved in (config.json `dtype` / `torch_dtype`), fp32 if unknown."""
    import torch

    config_file = Path(path) / "config.json"
    name = None
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _as_set(value: Any) -> set[int]:
    if value is None:
        return set()
    return set(value) if isinstance(value, (list, tuple, set)) else {int(value)}
