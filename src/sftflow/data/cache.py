"""The tokenized-data cache: the data step's output saved once, reused while nothing that shapes it changes.

The key hashes the content of every data file read (and each dataset's dataset_info.json entry), the
tokenizer (vocabulary, merges, special tokens, chat template), every DataArguments field that shapes the
tokens (template, cutoff_len, masking and packing flags, max_samples, val_size, mixing, ...), the stage,
the seed and which splits are built. Changing any of them gives a new key, so the data is rebuilt;
`overwrite_cache: true` rebuilds it anyway. Streamed data is never cached. Hub datasets are keyed by id,
subset and split (their content is not read up front): set overwrite_cache after the hub copy changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow import __version__
from sftflow.data.content import file_digest
from sftflow.data.loader import data_files
from sftflow.data.registry import ONLINE, get_dataset_spec, read_registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sftflow.config.args import DataArguments


logger = logging.getLogger(__name__)

# Bump when the conversion or tokenization code changes what it writes, so old entries are not reused.
CACHE_FORMAT = 3
# DataArguments fields that do not change the tokenized data.
NOT_IN_KEY = {
    "preview_rows",
    "overwrite_cache",
    "tokenized_cache_dir",
    "preprocessing_num_workers",
    "buffer_size",
}


def default_cache_root() -> Path:
    return Path(os.environ.get("SFTFLOW_CACHE", Path.home() / ".cache" / "sftflow")) / "tokenized"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids: the tokenizer model and its settings, special tokens, chat template."""
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "chat_template", None))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:  # slow tokenizers: the vocabulary stands in for the model
        parts.append(json.dumps(sorted(tokenizer.get_vocab().items())))
    parts.append(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))
    parts.append(json.dumps([tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def dataset_fingerprint(name: str, dataset_dir: str, stage: str) -> dict[str, Any]:
    """The registry entry of `name` and the content hash of each of its local files."""

    spec = get_dataset_spec(name, dataset_dir, stage)
    entry = {"hub": [spec.hf_hub_url, spec.subset, spec.split, spec.folder]}
    if dataset_dir != ONLINE:
        entry["entry"] = read_registry(dataset_dir)[name]
    if spec.file_name:
        entry["files"] = {
            str(p.relative_to(dataset_dir)): file_digest(p) for p in data_files(spec, dataset_dir)
        }
    return entry


def cache_key(
    data_args: DataArguments,
    stage: str,
    seed: int,
    splits: list[str],
    tokenizer: PreTrainedTokenizerBase,
    vision: str | None = None,
) -> str:
    """The hex key of one run's data step (see the module docstring for what goes into it); `vision` is
    the image settings' fingerprint (`Vision.fingerprint`) of a model that sees."""

    names = [*(data_args.dataset or []), *(data_args.eval_dataset or [])]
    flags = {k: v for k, v in dataclasses.asdict(data_args).items() if k not in NOT_IN_KEY}
    material = {
        "format": CACHE_FORMAT,
        "sftflow": __version__,
        "flags": flags,
        "stage": stage,
        "seed": seed,
        "splits": splits,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **({"vision": vision} if vision is not None else {}),
        "data": {
            name: dataset_fingerprint(name, data_args.dataset_dir, stage) for name in dict.fromkeys(names)
        },
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclasses.dataclass
class TokenizedCache:
    """One cache entry: a folder holding a DatasetDict (`save_to_disk`) and a `meta.json` of counts."""

    path: Path

    @classmethod
    def for_key(cls, key: str, cache_dir: str | None) -> TokenizedCache:
        return cls((Path(cache_dir) if cache_dir else default_cache_root()) / key)

    def load(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The cached splits and meta, or None when there is no complete entry."""
        from datasets import load_from_disk

        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            splits = load_from_disk(str(self.path / "data"))
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except Exception as exc:  # a damaged entry is rebuilt, not fatal
            logger.warning("tokenized cache %s is unreadable (%s); rebuilding it.", self.path, exc)
            return None
        logger.info(
            "Loaded tokenized data from the cache %s (set overwrite_cache: true to rebuild).", self.path
        )
        return dict(splits), meta

    def save(self, splits: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write the entry atomically (a temp folder renamed into place), so a killed run leaves no half entry."""
        from datasets import DatasetDict

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        DatasetDict({k: v for k, v in splits.items() if v is not None}).save_to_disk(str(tmp / "data"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.replace(tmp, self.path)
        except OSError:
            # Another process (e.g. a second torchrun rank or a parallel run) placed the same key first;
            # same key means same content, so keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
            if not (self.path / "meta.json").is_file():
                raise
            return
        logger.info("Saved tokenized data to the cache %s", self.path)
