"""The dataset registry: `dataset_dir/dataset_info.json`, in LLaMA-Factory's format.

An entry names a local file or folder (`file_name`) or a hub dataset (`hf_hub_url`, with `subset` and
`split`), its `formatting` (alpaca, sharegpt or openai), whether it is pairwise (`ranking: true`, for the
rm stage), how its columns and (sharegpt) tags map to ours, and optionally `num_samples` (draw that many
rows, seeded), e.g.::

    "my_data": {"file_name": "my_data.json", "formatting": "alpaca",
                "columns": {"prompt": "instruction", "query": "input", "response": "output"}}

`dataset_dir: ONLINE` reads each dataset name as a hub id (alpaca formatting), as LLaMA-Factory does.
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
OPENAI_COLUMNS = {"messages": "messages", "tools": "tools"}
RANKING_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}
KTO_COLUMNS = {"kto_tag": "kto_tag"}
# Column keys LLaMA-Factory knows; the multimodal ones are refused with a clear message.
KNOWN_COLUMNS = {
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "tools",
    "chosen",
    "rejected",
    "kto_tag",
    "reasoning",  # sftflow's: the last answer's thought (see converters.py)
    "images",  # sft: image paths, one per <image> in the text (see images.py)
}
UNSUPPORTED_COLUMNS = {"videos", "audios"}
KNOWN_ENTRY_KEYS = {
    "file_name",
    "hf_hub_url",
    "formatting",
    "ranking",
    "columns",
    "tags",
    "split",
    "subset",
    "folder",
    "num_samples",
}
IGNORED_ENTRY_KEYS = {"ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"}
ONLINE = "ONLINE"
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "function_call",
}


@dataclass
class DatasetSpec:
    """One registry entry, with LLaMA-Factory's defaults filled in."""

    name: str
    file_name: str | None = None
    hf_hub_url: str | None = None
    formatting: Literal["alpaca", "sharegpt", "openai"] = "alpaca"
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    subset: str | None = None
    num_samples: int | None = None
    folder: str | None = None
    source: Path | None = None  # the dataset_info.json it came from, for error messages

    @property
    def where(self) -> str:
        """`dataset 'name' (file or hub id)`, the head of every error message about this dataset."""
        origin = self.file_name or self.hf_hub_url
        return f"dataset {self.name!r} ({origin})"


def read_registry(dataset_dir: str | Path) -> dict[str, dict]:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise SftflowError(
            f"no dataset registry at {path}"
            + (
                ""
                if path.is_absolute()
                else f" (dataset_dir is relative to the current directory, {Path.cwd()})"
            )
            + ". Set dataset_dir to the folder holding dataset_info.json."
        )
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SftflowError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(registry, dict):
        raise SftflowError(f"{path} must be a JSON object mapping dataset names to entries.")
    return registry


def get_dataset_spec(name: str, dataset_dir: str | Path, stage: str = "sft") -> DatasetSpec:
    """Look up `name` in the registry and validate its entry (LLaMA-Factory's keys and defaults).

    Raises:
        SftflowError: the name is not registered, its entry is malformed, or it does not suit `stage`
            (a `ranking` dataset outside rm, or a plain one in rm).
    """
    if str(dataset_dir) == ONLINE:
        return DatasetSpec(name=name, hf_hub_url=name, columns=dict(ALPACA_COLUMNS), source=None)
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
    unknown = sorted(set(entry) - KNOWN_ENTRY_KEYS - IGNORED_ENTRY_KEYS)
    if unknown:
        raise SftflowError(
            f"{source}: entry {name!r} has unknown keys {unknown}; known keys: {sorted(KNOWN_ENTRY_KEYS)}."
        )
    if not entry.get("file_name") and not entry.get("hf_hub_url"):
        raise SftflowError(f"{source}: entry {name!r} needs file_name (a local file/folder) or hf_hub_url.")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise SftflowError(
            f"{source}: entry {name!r} has formatting {formatting!r}; use alpaca, sharegpt or openai."
        )
    for key in ("columns", "tags"):
        if not isinstance(entry.get(key, {}), dict) or not all(
            isinstance(v, str) for v in entry.get(key, {}).values()
        ):
            raise SftflowError(f"{source}: entry {name!r}: {key} must map names to column/tag name strings.")
    columns_given = entry.get("columns", {})
    bad = sorted(set(columns_given) & UNSUPPORTED_COLUMNS)
    if bad:
        raise SftflowError(
            f"{source}: entry {name!r} maps {bad}: videos and audios are not supported (images are, in sft)."
        )
    if "images" in columns_given and stage != "sft":
        raise SftflowError(
            f"{source}: entry {name!r} maps images, which only the sft stage reads (stage here: {stage})."
        )
    bad = sorted(set(columns_given) - KNOWN_COLUMNS)
    if bad:
        raise SftflowError(
            f"{source}: entry {name!r} has unknown column keys {bad}; known: {sorted(KNOWN_COLUMNS)}."
        )
    bad = sorted(set(entry.get("tags", {})) - set(SHAREGPT_TAGS))
    if bad:
        raise SftflowError(
            f"{source}: entry {name!r} has unknown tag keys {bad}; known: {sorted(SHAREGPT_TAGS)}."
        )
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise SftflowError(f"{source}: entry {name!r}: ranking must be true or false, got {ranking!r}.")
    if ranking != (stage == "rm"):
        raise SftflowError(
            f"{source}: dataset {name!r} is {'pairwise (ranking: true)' if ranking else 'not pairwise'}, "
            f"so it cannot be used in the {stage} stage. "
            + (
                "Use it with stage: rm."
                if ranking
                else "The rm stage needs ranking: true with chosen/rejected."
            )
        )
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise SftflowError(f"{source}: entry {name!r}: num_samples must be a positive integer.")
    defaults = {"alpaca": ALPACA_COLUMNS, "sharegpt": SHAREGPT_COLUMNS, "openai": OPENAI_COLUMNS}[formatting]
    kto = KTO_COLUMNS if stage == "kto" else {}
    columns = {**defaults, **(RANKING_COLUMNS if ranking else {}), **kto, **columns_given}
    if formatting == "alpaca":
        tags = {}
    else:
        tags = {**(SHAREGPT_TAGS if formatting == "sharegpt" else OPENAI_TAGS), **entry.get("tags", {})}
    return DatasetSpec(
        name=name,
        file_name=entry.get("file_name"),
        hf_hub_url=entry.get("hf_hub_url"),
        formatting=formatting,
        ranking=ranking,
        columns=columns,
        tags=tags,
        split=entry.get("split", "train"),
        subset=entry.get("subset"),
        folder=entry.get("folder"),
        num_samples=num_samples,
        source=source,
    )
