"""The dataset registry: `dataset_dir/dataset_info.json`, in LLaMA-Factory's format.

An entry names a local file or folder (`file_name`) or a hub dataset (`hf_hub_url`), its `formatting`
(alpaca or sharegpt) and how its columns/tags map to ours, e.g.::

    "my_data": {"file_name": "my_data.json", "formatting": "alpaca",
                "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sftflow.errors import SftflowError

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}


@dataclass
class DatasetSpec:
    """One registry entry, with LLaMA-Factory's defaults filled in."""

    name: str
    file_name: str | None = None
    hf_hub_url: str | None = None
    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    subset: str | None = None
    num_samples: int | None = None
    source: Path | None = None  # the dataset_info.json it came from, for error messages


def read_registry(dataset_dir: str | Path) -> dict[str, dict]:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise SftflowError(
            f"no dataset registry at {path}. Set dataset_dir to the folder holding dataset_info.json."
        )
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SftflowError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(registry, dict):
        raise SftflowError(f"{path} must be a JSON object mapping dataset names to entries.")
    return registry


def get_dataset_spec(name: str, dataset_dir: str | Path) -> DatasetSpec:
    """Look up `name` in the registry and validate its entry.

    Raises:
        SftflowError: the name is not registered or its entry is malformed.
    """
    registry = read_registry(dataset_dir)
    source = Path(dataset_dir) / "dataset_info.json"
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = (
            f" Did you mean {close[0]!r}?"
            if close
            else f" Registered: {', '.join(sorted(registry)) or 'none'}."
        )
        raise SftflowError(f"dataset {name!r} is not in {source}.{hint}")
    entry = registry[name]
    if not isinstance(entry, dict):
        raise SftflowError(f"{source}: entry {name!r} must be an object.")
    known = {"file_name", "hf_hub_url", "formatting", "columns", "tags", "split", "subset", "num_samples"}
    unknown = sorted(set(entry) - known - {"ranking", "ms_hub_url", "om_hub_url", "script_url", "folder"})
    if unknown:
        raise SftflowError(
            f"{source}: entry {name!r} has unknown keys {unknown}; known keys: {sorted(known)}."
        )
    if not entry.get("file_name") and not entry.get("hf_hub_url"):
        raise SftflowError(f"{source}: entry {name!r} needs file_name (a local file/folder) or hf_hub_url.")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise SftflowError(f"{source}: entry {name!r} has formatting {formatting!r}; use alpaca or sharegpt.")
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    columns = {**defaults, **entry.get("columns", {})}
    tags = {**SHAREGPT_TAGS, **entry.get("tags", {})} if formatting == "sharegpt" else {}
    return DatasetSpec(
        name=name,
        file_name=entry.get("file_name"),
        hf_hub_url=entry.get("hf_hub_url"),
        formatting=formatting,
        columns=columns,
        tags=tags,
        split=entry.get("split", "train"),
        subset=entry.get("subset"),
        num_samples=entry.get("num_samples"),
        source=source,
    )
