"""The final save of a run, atomic like its checkpoints: nothing half-written under a real name.

Every final file (the adapter or model, the tokenizer, trainer_state.json, sftflow_args.yaml, the metrics)
is written into `output_dir/.tmp-final/`, fsynced, then renamed into place one by one, the run's completion
marker `all_results.json` last (the board reads it as "finished"). A run killed or out of disk mid-save
leaves its earlier files and a staging dir the next run removes, never a truncated tokenizer.json beside a
complete adapter. A failed write (a full disk above all) becomes one `SftflowError` naming the path and,
for a full disk, about how many bytes the save needs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftflow.errors import SftflowError

STAGING_NAME = ".tmp-final"
COMPLETION_MARKER = "all_results.json"


def staging_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / STAGING_NAME


def remove_final_staging(output_dir: str | Path) -> None:
    """Delete a staging dir left by a final save that was killed."""
    shutil.rmtree(staging_dir(output_dir), ignore_errors=True)


def weights_bytes(model: Any) -> int:
    """About how many bytes saving `model` writes: the trainable weights of an adapter (PEFT), else every
    weight (tied weights once; a ZeRO-3 shard counts its full size)."""
    peft = hasattr(model, "peft_config")
    sizes: dict[int, int] = {}
    for param in model.parameters():
        if peft and not param.requires_grad:
            continue
        numel = getattr(param, "ds_numel", None) or param.numel()
        sizes[param.data_ptr() or id(param)] = numel * param.element_size()
    return sum(sizes.values())


def human_bytes(n: float) -> str:
    """`n` bytes for a message.

    >>> human_bytes(1536), human_bytes(3 * 10**9)
    ('1.5 KiB', '2.8 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def save_error(exc: OSError, output_dir: Path, needed: int, where: str = "the final save") -> SftflowError:
    """The one-line error for an OSError while writing `output_dir`'s files."""
    path = exc.filename or output_dir
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SftflowError(
            f"{where} of {output_dir} failed writing {path}: no space left on device (it needs about "
            f"{human_bytes(needed)} = {needed} bytes free for what it writes). Nothing "
            "half-written was left under a real name; free space on that disk or choose an output_dir on "
            "another one, then run again (with save_steps checkpoints, resume_from_checkpoint=true picks up "
            "the last one)."
        )
    return SftflowError(
        f"{where} of {output_dir} failed writing {path}: {exc.strerror or exc}. Nothing half-written was "
        "left under a real name; fix the permissions or the disk, or choose another output_dir, then run again."
    )


def as_os_error(exc: BaseException) -> OSError | None:
    """`exc` as the OSError behind it: an OSError itself, safetensors' wrapped I/O error (`IoError(Os {
    code: 28, ...})`) or torch.save's "file write failed"; None for anything else.

    >>> as_os_error(RuntimeError("IoError(Os { code: 28, kind: StorageFull })")).errno
    28
    """
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    if match := re.search(r"(?:\bcode: |os error )(\d+)", text):
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(exc, RuntimeError) and "file write failed" in text:
        return OSError(errno.EIO, "file write failed (is the disk full?)")
    return None


@contextlib.contextmanager
def staged(output_dir: str | Path, needed: int) -> Iterator[Path]:
    """A fresh staging dir for the final files; an OSError inside becomes `save_error` and the staging
    dir is removed. Publish with `publish` once everything is written."""
    output_dir = Path(output_dir)
    stage = staging_dir(output_dir)
    try:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        yield stage
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        os_error = as_os_error(exc)
        if os_error is None:
            raise
        raise save_error(os_error, output_dir, needed) from None


def publish(stage: Path, output_dir: str | Path, needed: int, last: tuple[str, ...] = ()) -> list[Path]:
    """fsync everything in `stage`, then rename each entry into `output_dir` (names in `last` at the end,
    in that order) and remove `stage`. Returns the published paths."""
    output_dir = Path(output_dir)
    try:
        entries = sorted(
            stage.iterdir(),
            key=lambda p: (p.name in last, last.index(p.name) if p.name in last else 0, p.name),
        )
        for entry in entries:
            _fsync_tree(entry)
        published = []
        for entry in entries:
            target = output_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
            published.append(target)
            _fsync_dir(output_dir)
        stage.rmdir()
        return published
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise save_error(exc, output_dir, needed) from None


def write_metrics(output_dir: Path, stage: Path, split: str, metrics: dict[str, Any]) -> None:
    """`Trainer.save_metrics` into `stage`: `{split}_results.json` and all_results.json merged with the
    one already in `output_dir`."""
    combined: dict[str, Any] = {}
    existing = output_dir / COMPLETION_MARKER
    if existing.is_file():
        with contextlib.suppress(ValueError, OSError):
            combined = json.loads(existing.read_text(encoding="utf-8"))
    combined.update(metrics)
    (stage / f"{split}_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True))
    (stage / COMPLETION_MARKER).write_text(json.dumps(combined, indent=4, sort_keys=True))


def save_metrics_atomically(output_dir: str | Path, split: str, metrics: dict[str, Any]) -> None:
    """`{split}_results.json` and the merged all_results.json, each written whole or not at all."""
    output_dir = Path(output_dir)
    needed = len(json.dumps(metrics)) * 4 + 4096
    with staged(output_dir, needed) as stage:
        write_metrics(output_dir, stage, split, metrics)
    publish(stage, output_dir, needed, last=(COMPLETION_MARKER,))


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in paths:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
