"""Arguments for the commands that use a trained model (chat, api, predict): from a run's output_dir, a
config file, or an explicit model and adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftflow.config.parser import RunArgs, args_from_dict, parse_overrides, read_config_file
from sftflow.errors import SftflowError


def run_dir_keys(run: Path) -> dict[str, Any]:
    """The keys a finished run dir implies: its sftflow_args.yaml, with the dir itself as the adapter (LoRA)
    or the model (full/freeze). Without a sftflow_args.yaml, an adapter's base model comes from its
    adapter_config.json.

    Raises:
        SftflowError: the dir holds neither an adapter nor a model.
    """
    keys = read_config_file(run / "sftflow_args.yaml") if (run / "sftflow_args.yaml").is_file() else {}
    if (run / "adapter_config.json").is_file():
        keys["adapter_name_or_path"] = str(run)
        if "model_name_or_path" not in keys:
            base = json.loads((run / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if base:
                keys["model_name_or_path"] = base
    elif (run / "config.json").is_file():
        keys["model_name_or_path"] = str(run)
        keys.pop("adapter_name_or_path", None)  # a full/freeze run's dir is the whole model
    else:
        raise SftflowError(
            f"{run} holds neither a LoRA adapter (adapter_config.json) nor a model (config.json). "
            "Point at a run's output_dir, a config file, or use --model/--adapter."
        )
    keys["output_dir"] = str(run)
    return keys


def infer_args(
    target: str | None,
    overrides: list[str],
    model: str | None = None,
    adapter: str | None = None,
    output_dir: str | None = None,
) -> RunArgs:
    """Arguments for chat/api/predict from `target` (a run dir or a config file, or None), then `model` /
    `adapter` (--model / --adapter), then `key=value` overrides, each winning over the one before.
    `output_dir`, when given, replaces the run dir's (predict writes into RUN_DIR/predict).

    Raises:
        SftflowError: the dir holds no adapter or model, or the config is invalid.
    """
    keys: dict[str, Any] = {}
    recorded: set[str] = set()
    if target and Path(target).is_dir():
        keys = run_dir_keys(Path(target))
        recorded = set(keys)
    elif target:
        keys = read_config_file(target)
    if model:
        keys["model_name_or_path"] = model
    if adapter:
        keys["adapter_name_or_path"] = adapter
    if output_dir:
        keys["output_dir"] = output_dir
    given = parse_overrides(overrides)
    keys.update(given)
    recorded -= {"model_name_or_path", "adapter_name_or_path", "output_dir", *given}
    return args_from_dict(keys, require_output_dir=False, recorded=recorded)
