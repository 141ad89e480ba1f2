"""Load registered datasets from files or the hub and convert them to chat messages."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sftflow.data.converters import RowError, alpaca_to_messages, sharegpt_to_messages
from sftflow.data.registry import DatasetSpec, get_dataset_spec
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from datasets import Dataset

    from sftflow.config import DataArguments

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
MAX_REPORTED_ROWS = 5


def _data_files(spec: DatasetSpec, dataset_dir: Path) -> tuple[str, list[str]]:
    path = dataset_dir / spec.file_name
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in FILE_BUILDERS)
    elif path.is_file():
        files = [str(path)]
    else:
        raise SftflowError(f"dataset {spec.name!r}: file {path} does not exist (file_name in {spec.source}).")
    if not files:
        raise SftflowError(f"dataset {spec.name!r}: folder {path} has no {', '.join(FILE_BUILDERS)} files.")
    builders = {FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise SftflowError(
            f"dataset {spec.name!r}: {path} must hold files of one type among {', '.join(FILE_BUILDERS)}."
        )
    return builders.pop(), files


def load_raw(spec: DatasetSpec, dataset_dir: str | Path) -> Dataset:
    """Read the raw rows of one registered dataset.

    Raises:
        SftflowError: the file is missing or unreadable, or the hub is unreachable.
    """
    from datasets import load_dataset

    if spec.file_name:
        builder, files = _data_files(spec, Path(dataset_dir))
        try:
            return load_dataset(builder, data_files=files, split="train")
        except Exception as exc:  # datasets/pyarrow raise many types for malformed files
            raise SftflowError(
                f"dataset {spec.name!r}: could not read {', '.join(files)} as {builder}: {exc}. "
                f"Check the file is valid {builder} with the same columns in every row."
            ) from None
    try:
        return load_dataset(spec.hf_hub_url, name=spec.subset, split=spec.split)
    except Exception as exc:
        raise SftflowError(
            f"dataset {spec.name!r}: could not load {spec.hf_hub_url!r} from the hub ({exc}). "
            "Offline? Download it once and register it with file_name instead."
        ) from None


def to_messages(raw: Dataset, spec: DatasetSpec, where: str) -> Dataset:
    """Convert raw rows to a `messages` column; refuse the dataset if any row is malformed.

    Raises:
        SftflowError: listing the first malformed rows (file and row number) and why.
    """
    missing = _missing_columns(raw.column_names, spec)
    if missing:
        raise SftflowError(
            f"{where}: column(s) {missing} not found; the file has {raw.column_names}. "
            f'Map your column names under "columns" in {spec.source}.'
        )

    def convert(row: dict, index: int) -> dict:
        try:
            if spec.formatting == "alpaca":
                messages = alpaca_to_messages(row, spec.columns)
            else:
                messages = sharegpt_to_messages(row, spec.columns, spec.tags)
            return {"messages": messages, "error": ""}
        except RowError as exc:
            return {"messages": [], "error": f"row {index}: {exc}"}

    converted = raw.map(
        convert, with_indices=True, remove_columns=raw.column_names, desc=f"Converting {spec.name}"
    )
    errors = [e for e in converted["error"] if e]
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ROWS])
        more = (
            f"\n  ... and {len(errors) - MAX_REPORTED_ROWS} more" if len(errors) > MAX_REPORTED_ROWS else ""
        )
        raise SftflowError(
            f"{where}: {len(errors)} of {len(raw)} rows are malformed (rows counted from 0):\n  {shown}{more}\n"
            "Fix or remove these rows; nothing was trained."
        )
    return converted.remove_columns("error")


def _missing_columns(present: list[str], spec: DatasetSpec) -> list[str]:
    if spec.formatting == "alpaca":
        required = [spec.columns["prompt"], spec.columns["response"]]
    else:
        required = [spec.columns["messages"]]
    return [c for c in required if c not in present]


def load_conversations(names: list[str], data_args: DataArguments, seed: int) -> Dataset:
    """Load, convert and concatenate the named datasets (each capped at max_samples)."""
    from datasets import concatenate_datasets

    parts = []
    for name in names:
        spec = get_dataset_spec(name, data_args.dataset_dir)
        raw = load_raw(spec, data_args.dataset_dir)
        where = f"dataset {name!r} ({Path(data_args.dataset_dir) / spec.file_name if spec.file_name else spec.hf_hub_url})"
        limit = min(n for n in (spec.num_samples, data_args.max_samples, len(raw)) if n is not None)
        raw = raw.select(range(limit))
        parts.append(to_messages(raw, spec, where))
        logger.info("dataset %s: %d examples", name, len(parts[-1]))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def split_train_eval(dataset: Dataset, val_size: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out `val_size` examples (a fraction, or a count when >= 1), seeded."""
    test_size = int(val_size) if val_size >= 1 else val_size
    if isinstance(test_size, int) and test_size >= len(dataset):
        raise SftflowError(f"val_size={test_size} leaves no training data ({len(dataset)} examples).")
    parts = dataset.train_test_split(test_size=test_size, seed=seed)
    return parts["train"], parts["test"]
