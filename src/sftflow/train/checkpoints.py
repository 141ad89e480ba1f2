"""Checkpoints on disk: which are complete, which one to resume from, and the one parser of resume words.

Checkpoints are written into `.tmp-checkpoint-N/` and renamed to `checkpoint-N` when complete (see
`trainer.py`), so a run killed mid-save never leaves a half checkpoint under a real name.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sftflow.errors import SftflowError

logger = logging.getLogger(__name__)

STAGING_PREFIX = (
    ".tmp-"  # staging dirs: output_dir/.tmp-checkpoint-N/checkpoint-N (never matched by checkpoint-*)
)
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"  # the sentinel of transformers' own JIT checkpoints
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_RESUME_LATEST = {"true", "latest", "last"}
_RESUME_NONE = {"", "false", "none", "null"}


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint dir is complete when the Trainer wrote its state file (the last file it writes) and
    no in-progress marker is left in it."""
    return (path / "trainer_state.json").is_file() and not (path / INCOMPLETE_MARKER).exists()


def complete_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """The `checkpoint-N` dirs under `output_dir`, complete ones and incomplete ones, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return [], []
    found = sorted(
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    )
    complete = [p for _, p in found if is_complete_checkpoint(p)]
    return complete, [p for _, p in found if not is_complete_checkpoint(p)]


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint to resume from: `true`/`latest` means the latest complete one in `output_dir`.

    Raises:
        SftflowError: there is no complete checkpoint to resume from, or the named one is incomplete.
    """
    value = resume_word(resume_from_checkpoint)
    if value is None:
        return None
    if value == "latest":
        complete, incomplete = complete_checkpoints(output_dir)
        if incomplete:
            logger.warning(
                "skipping incomplete checkpoints (a save was interrupted): %s",
                ", ".join(p.name for p in incomplete),
            )
        if not complete:
            raise SftflowError(
                f"resume_from_checkpoint: no complete checkpoint in {output_dir}"
                + (f" (incomplete: {', '.join(p.name for p in incomplete)})" if incomplete else "")
                + ". Checkpoints are written with save_strategy: steps and save_steps: N; to start over, "
                "drop resume_from_checkpoint and set overwrite_output_dir: true."
            )
        logger.info("resuming from %s", complete[-1])
        return str(complete[-1])
    path = Path(value)
    if not path.is_dir():
        raise SftflowError(
            f"resume_from_checkpoint: {path} is not a directory (give a checkpoint-N dir or true)."
        )
    if not is_complete_checkpoint(path):
        raise SftflowError(
            f"resume_from_checkpoint: {path} is incomplete (no trainer_state.json, or its save was interrupted). "
            "Use resume_from_checkpoint: true to pick the latest complete checkpoint."
        )
    return str(path)


def resume_word(value: Any) -> str | None:
    """`resume_from_checkpoint` read once: None (do not resume), "latest", or a checkpoint path.

    >>> resume_word("False"), resume_word(True), resume_word(" last "), resume_word("out/checkpoint-2")
    (None, 'latest', 'latest', 'out/checkpoint-2')
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _RESUME_NONE):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in _RESUME_LATEST):
        return "latest"
    return str(value)


def remove_staging_dirs(output_dir: str | Path) -> None:
    """Delete staging dirs left by a save that was killed (their checkpoint never became visible)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for path in output_dir.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
        logger.warning("removing %s: a checkpoint save that was interrupted", path)
        shutil.rmtree(path, ignore_errors=True)
