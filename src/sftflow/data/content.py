"""Local data files are known by their content: the sha256 of their bytes keys both sftflow's tokenized
cache (`cache.py`) and the `datasets` arrow cache a file is read through (`loader.py`)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_cache_dir(digest: str) -> str:
    """The `datasets` cache dir for a local file whose bytes hash to `digest`.

    `datasets` keys a local file's arrow cache by its path and modification time, so a file rewritten with
    other rows but the same size and mtime would be served from the old arrow. Under a dir named by the
    content hash, whatever `datasets` finds was built from these very bytes.
    """
    from datasets import config

    return str(Path(config.HF_DATASETS_CACHE) / "sftflow-local" / digest[:32])
