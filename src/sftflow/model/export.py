"""`sftflow export CONFIG`: merge LoRA adapter(s) into the base model and write a standard HF model dir.

The dir holds safetensors shards (at most `export_size` GB each), config.json, generation_config.json
(stopping at the chat template's end-of-turn token) and the tokenizer with its chat template, so
`AutoModelForCausalLM.from_pretrained(export_dir)` loads it with no sftflow installed. Keys are
LLaMA-Factory's: model_name_or_path, adapter_name_or_path (comma-separated to stack several),
export_dir, export_size, template, export_hub_model_id.

A model that sees (LLaVA, Qwen2-VL: `sftflow.data.vision`) exports the same way, with its image processor
files beside it, so `AutoModelForImageTextToText.from_pretrained(export_dir)` loads it; its GGUF export is
refused (llama.cpp needs a separate mmproj file for the vision tower).

`export_format: gguf` also writes `model-<export_quantization>.gguf` (llama.cpp, LM Studio; see
`sftflow.model.gguf`) and an Ollama `Modelfile` beside it (`sftflow.model.modelfile`).

Stops are proven at every export: the token training labelled as each answer's end (found by encoding a
probe conversation exactly as training does) must be what the written generation_config.json and the
GGUF's eos/eot stop on, read back from disk; otherwise the export is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from sftflow.config.parser import read_config_file
from sftflow.config.run_lock import LOCK_NAME, check_writable_dir, is_lock_file, owned
from sftflow.data.encode import IGNORE_INDEX, encode_sft, stop_token_ids
from sftflow.data.loader import load_conversations
from sftflow.data.template import apply_template, set_default_system
from sftflow.data.thinking import resolve_thinking, template_with_mode
from sftflow.data.vision import vision_config
from sftflow.errors import SftflowError
from sftflow.model.adapter import adapter_paths, check_adapter_dir, merge_adapters
from sftflow.model.loader import is_quantized, load_model, load_tokenizer, model_path, resolve_dtype
from sftflow.model.modelfile import fixed_system_prompt, with_default_system, write_modelfile

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sftflow.config.args import DataArguments, ModelArguments

logger = logging.getLogger(__name__)


def export_model(
    model_args: ModelArguments,
    data_args: DataArguments | None = None,
    overwrite: bool = False,
    enable_thinking: bool | None | Literal["trained"] = "trained",
) -> Path:
    """Merge `adapter_name_or_path` into `model_name_or_path` and save the result to `export_dir`.

    The merge runs in fp32 on CPU (exact for any base dtype); the weights are then written in `dtype`,
    or with `dtype: auto` in the base checkpoint's own dtype.

    Args:
        model_args: model, adapters, export_dir, export_size, dtype, export_format, export_quantization,
            export_hub_model_id.
        data_args: its `template` (and `template_file`, when set) replace the saved chat template; its
            `dataset`, when set, is read for a system prompt shared by every row (the Modelfile's SYSTEM).
        overwrite: allow a non-empty export_dir (its old weight files are removed first).
        enable_thinking: the thinking mode the exported chat template defaults to (a reasoning template;
            `_write_thinking_default`); `trained`: the run's own, read from the sftflow_args.yaml beside
            the last adapter (or in the model dir).

    Returns:
        The export dir.

    Raises:
        SftflowError: no export_dir, a quantized base, invalid adapters, a non-empty export_dir, an export
            that would not stop on the trained end-of-turn token, a model GGUF export does not support, or
            export_hub_model_id while offline.
    """

    base, sees = _check_exportable(model_args)
    export_dir = Path(model_args.export_dir).expanduser()
    allow_pickle = not model_args.use_safetensors
    paths = adapter_paths(model_args.adapter_name_or_path)
    refuse_overlap(export_dir, [base, *paths])  # before anything in export_dir is deleted
    with owned(export_dir, "sftflow export", key="export_dir"):
        _prepare_export_dir(export_dir, overwrite)
        for path in paths:
            check_adapter_dir(path, allow_pickle)

        tokenizer = _export_tokenizer(model_args, paths, data_args)
        trained = _run_keys(base, paths)
        default_system = getattr(data_args, "default_system", None) or trained.get("default_system")
        set_default_system(tokenizer, default_system)
        # without default_system, a conversation with no system message gets the one every training row
        # had, not the base tokenizer's default
        system = None if default_system else _fixed_system(data_args)
        if system and isinstance(tokenizer.chat_template, str):
            tokenizer.chat_template = with_default_system(tokenizer.chat_template, system)
        _write_thinking_default(tokenizer, trained, enable_thinking)
        end_id = trained_end_token(tokenizer)
        merge_args = dataclasses.replace(model_args, dtype="float32")
        model = load_model(merge_args, tokenizer, head="image" if sees else "lm")
        if is_quantized(model):
            raise SftflowError(
                f"model_name_or_path {base} loaded as a quantized model; export needs full precision."
            )
        model = merge_adapters(model, paths, allow_pickle)
        stops = sorted(stop_token_ids(tokenizer) | _as_set(model.generation_config.eos_token_id))
        if model_args.export_format == "gguf":  # from the fp32 merge, before the cast below
            name = model_name(model_args.model_name_or_path or base)
            _export_gguf(
                model, tokenizer, export_dir, model_args.export_quantization, end_id, stops, name, system
            )

        out_dtype = resolve_dtype(model_args.dtype) if model_args.dtype != "auto" else _checkpoint_dtype(base)
        model.to(out_dtype)
        model.config.use_cache = True  # training runs turn it off; generation wants it
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(export_dir, max_shard_size=int(model_args.export_size * 10**9))
        tokenizer.save_pretrained(export_dir)
        if sees:  # the image processor (and LLaVA's processor settings), so the dir loads as a whole
            for name in IMAGE_PROCESSOR_FILES:
                if (Path(base) / name).is_file():
                    shutil.copy(Path(base) / name, export_dir / name)
        shards = sorted(p.name for p in export_dir.glob("*.safetensors"))
        logger.info(
            "wrote %s: %d safetensors file(s), %s, %d adapter(s) merged, eos %s",
            export_dir,
            len(shards),
            str(out_dtype).replace("torch.", ""),
            len(paths),
            stops,
        )
        prove_hf_stops(export_dir, end_id)
        if model_args.export_hub_model_id:
            _push_to_hub(export_dir, model_args.export_hub_model_id)
        return export_dir


def _check_exportable(model_args: ModelArguments) -> tuple[str, bool]:
    """The base model's path and whether it sees, once the export is known to be possible.

    Raises:
        SftflowError: no export_dir, a quantized base, hub upload while offline, GGUF for a model that sees.
    """
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
    if model_args.export_hub_model_id:
        _check_hub_online(model_args.export_hub_model_id)
    sees = vision_config(base) is not None
    if sees and model_args.export_format == "gguf":
        raise SftflowError(
            f"export_format: gguf is not supported for a model that sees ({base}): llama.cpp runs its vision "
            "tower from a separate mmproj GGUF, which sftflow does not write. Use export_format: hf."
        )
    return base, sees


IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def refuse_overlap(export_dir: Path, sources: list[str]) -> None:
    """Refuse an export_dir that is, holds or sits inside a model or adapter the export reads: preparing
    it would delete those weights before they are read.

    Raises:
        SftflowError: export_dir overlaps a source (named), or is a file.
    """
    check_writable_dir(export_dir, "export_dir")
    target = export_dir.expanduser().resolve()
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            continue  # a hub id: nothing local to overwrite
        path = path.resolve()
        if target == path:
            how = "is"
        elif target in path.parents:
            how = "contains"
        elif path in target.parents:
            how = "is inside"
        else:
            continue
        raise SftflowError(
            f"export_dir {export_dir} {how} {path}, which the export reads (the base model or an adapter): "
            "writing the merged model there would delete or mix with the weights it merges. Choose a new "
            f"directory, e.g. export_dir: {path.parent / (path.name + '-merged')}."
        )


def trained_end_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id training labels as the end of an answer: the last trained label of a probe conversation
    encoded exactly as training encodes it. Without a chat template (a pt-stage model) it is eos, which the
    pt stage writes after every text.

    Raises:
        SftflowError: the chat template writes no end-of-turn token after an answer (training refuses it
            too), rejects both probe conversations, or there is neither a chat template nor eos.
    """
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        if tokenizer.eos_token_id is None:
            raise SftflowError(
                "the tokenizer has neither a chat template nor an eos token, so nothing would end generation. "
                "Set template (e.g. template: chatml) or give the tokenizer an eos token."
            )
        return int(tokenizer.eos_token_id)
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "sftflow probe answer"}]
    reasons = []
    for probe in (turn, [{"role": "system", "content": "Be brief."}, *turn]):
        try:
            labels = encode_sft(tokenizer, probe, cutoff_len=4096).labels
        except TemplateError as exc:  # e.g. a template that insists on a system message
            reasons.append(str(exc))
            continue
        return [t for t in labels if t != IGNORE_INDEX][-1]
    raise SftflowError(
        f"the chat template rejects a plain conversation ({'; '.join(reasons)}), so the export cannot "
        "prove where answers end."
    )


def prove_hf_stops(export_dir: Path, end_id: int) -> None:
    """Reload the written tokenizer and generation_config.json and check generation stops where training
    ended answers.

    Raises:
        SftflowError: the reloaded files would not stop on the trained end-of-turn token `end_id`.
    """
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    eos = _as_set(GenerationConfig.from_pretrained(export_dir).eos_token_id)
    try:
        reloaded = trained_end_token(tokenizer)
    except (SftflowError, ValueError) as exc:
        raise SftflowError(
            f"refusing the export {export_dir}: the saved tokenizer cannot encode a chat: {exc}"
        ) from None
    if reloaded != end_id or end_id not in eos:
        name = tokenizer.convert_ids_to_tokens(end_id)
        raise SftflowError(
            f"refusing the export {export_dir}: training ended answers with {name!r} (id {end_id}), but the saved "
            f"tokenizer ends them with id {reloaded} and generation_config.json stops on {sorted(eos)}; "
            "generation would not stop."
        )
    logger.info(
        "stop proven: %s ends answers with %r (id %d)",
        export_dir,
        tokenizer.convert_ids_to_tokens(end_id),
        end_id,
    )


def _export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    export_dir: Path,
    quantization: str,
    end_id: int,
    stops: list[int],
    name: str,
    system: str | None,
) -> None:
    """Write, read back and prove model-<quantization>.gguf (`general.name` = `name`), then the Modelfile
    beside it (SYSTEM = `system`)."""
    from sftflow.model.gguf import check_gguf, gguf_file_name, write_gguf

    start = time.perf_counter()
    path = export_dir / gguf_file_name(quantization)
    partial = path.with_name(f".{path.name}.partial")  # renamed into place only once proven
    try:
        summary = write_gguf(model, tokenizer, partial, quantization, end_id, name)
        check_gguf(summary, tokenizer)
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info(
        "wrote %s: %.1f MB in %.1f s, pre-tokenizer %s, eos/eot %r (id %d)",
        path,
        summary.size_bytes / 1e6,
        time.perf_counter() - start,
        summary.pre_tokenizer,
        summary.end_of_turn,
        end_id,
    )
    texts = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stops, key=lambda i: i != end_id)]
    try:
        write_modelfile(export_dir / "Modelfile", path.name, tokenizer, texts, system)
    except SftflowError as exc:
        logger.warning(
            "no Ollama Modelfile written: %s The GGUF carries the chat template for llama.cpp.", exc
        )
        return
    logger.info("wrote %s (ollama create NAME -f %s)", export_dir / "Modelfile", export_dir / "Modelfile")


def model_name(model_name_or_path: str, hops: int = 8) -> str:
    """The GGUF `general.name`: the model's own name, the last part of its hub id or dir; for a full or
    freeze run dir, that of the model it was trained from (its sftflow_args.yaml), not the export dir's."""
    given = str(model_name_or_path)
    for _ in range(hops):
        record = Path(given).expanduser() / "sftflow_args.yaml"
        if not record.is_file():
            break
        try:
            base = (yaml.safe_load(record.read_text(encoding="utf-8")) or {}).get("model_name_or_path")
        except (OSError, yaml.YAMLError):
            break
        if not base or str(base) == given:
            break
        given = str(base)
    return Path(given.rstrip("/")).name or given


def _fixed_system(data_args: DataArguments | None) -> str | None:
    """The system prompt every training row shares, when the config names the training data."""
    if data_args is None or not data_args.dataset:
        return None

    return fixed_system_prompt(load_conversations(data_args.dataset, data_args, seed=0)["messages"])


def _check_hub_online(repo_id: str) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise SftflowError(
            f"export_hub_model_id {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset it and log "
            f"in (`hf auth login`), or drop export_hub_model_id and upload export_dir later with "
            f"`hf upload {repo_id} EXPORT_DIR`."
        )


def _push_to_hub(export_dir: Path, repo_id: str) -> None:
    """Upload export_dir as it was written and proven (weights, tokenizer, GGUF, Modelfile)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(export_dir),
            commit_message="sftflow export",
            ignore_patterns=[LOCK_NAME],  # this export's own claim on the dir
        )
    except Exception as exc:  # network, auth and permission errors all leave the local export intact  # noqa: BLE001
        raise SftflowError(
            f"could not upload {export_dir} to the hub repo {repo_id}: {str(exc).splitlines()[0] if str(exc) else exc!r}. "
            f"The local export is complete; retry with `hf upload {repo_id} {export_dir}`."
        ) from None
    logger.info("uploaded %s to https://huggingface.co/%s", export_dir, repo_id)


def _prepare_export_dir(export_dir: Path, overwrite: bool) -> None:
    if export_dir.is_dir() and any(not is_lock_file(p) for p in export_dir.iterdir()):
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


def _run_keys(base: str, paths: list[str]) -> dict[str, Any]:
    """The keys of the run being exported: the sftflow_args.yaml beside the last adapter (or in a full
    run's model dir), {} without one."""
    run = Path(paths[-1] if paths else base).expanduser() / "sftflow_args.yaml"
    return read_config_file(run) if run.is_file() else {}


def _write_thinking_default(
    tokenizer: PreTrainedTokenizerBase, trained: dict[str, Any], enable: bool | None | Literal["trained"]
) -> None:
    """Make the run's thinking mode the chat template's default (HF tokenizer, GGUF, Modelfile all take
    this template): a run trained with enable_thinking false exports a template whose generation prompt
    ends with the empty block unless a request sets the flag (issue #24)."""
    if enable == "trained":
        enable = trained.get("enable_thinking", True)
    thinking = resolve_thinking(tokenizer, enable, False)  # type: ignore[arg-type]
    source = template_with_mode(tokenizer, thinking) if thinking is not None else None
    if source is not None:
        tokenizer.chat_template = source
        logger.info("chat template: enable_thinking defaults to %s, as the run trained", enable)


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
