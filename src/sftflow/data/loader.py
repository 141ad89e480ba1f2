"""Load registered datasets (files, folders or the hub; in memory or streamed), convert every row to the
common form of the stage (see `converters`), and mix several datasets.

Bad input never passes silently: a malformed file, line or row stops the run with the dataset, file, row
and field, or, with `skip_bad_rows: true`, is skipped and counted in a warning. A dataset left with no
rows is always an error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.data.content import content_cache_dir, file_digest
from sftflow.data.converters import RowError, Stage, convert_row
from sftflow.data.registry import DatasetSpec, get_dataset_spec
from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from datasets import Dataset, Features, IterableDataset

    from sftflow.config.args import DataArguments

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
MAX_REPORTED_ROWS = 5


@dataclass
class DatasetCount:
    """Rows of one dataset: read from its source, skipped as malformed, and kept (after sampling/caps)."""

    read: int = 0
    skipped: int = 0
    kept: int = 0
    skip_reasons: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    """What loading did, per dataset name (filled in by `load_conversations`, shown by `preview`)."""

    datasets: dict[str, DatasetCount] = field(default_factory=dict)


def features_for(stage: Stage) -> Features:
    """The arrow schema of the common form of `stage` (fixed, so every source and part concatenates)."""
    from datasets import Features, Value

    message = [{"role": Value("string"), "content": Value("string")}]
    if stage == "pt":
        return Features({"text": Value("string")})
    if stage == "rm":
        return Features(
            {
                "messages": message,
                "chosen": Value("string"),
                "rejected": Value("string"),
                "tools": Value("string"),
            }
        )
    if stage == "kto":
        return Features({"messages": message, "tools": Value("string"), "kto_tag": Value("bool")})
    if stage == "grpo":
        return Features({"messages": message, "tools": Value("string"), "extra": Value("string")})
    return Features({"messages": message, "tools": Value("string"), "images": [Value("string")]})


def _placeholder(stage: Stage) -> dict[str, Any]:
    """A well-typed stand-in for a malformed row (filtered out right after conversion)."""
    message = [{"role": "", "content": ""}]
    if stage == "pt":
        return {"text": ""}
    if stage == "rm":
        return {"messages": message, "chosen": "", "rejected": "", "tools": ""}
    if stage == "kto":
        return {"messages": message, "tools": "", "kto_tag": False}
    if stage == "grpo":
        return {"messages": message, "tools": "", "extra": "{}"}
    return {"messages": message, "tools": "", "images": []}


def data_files(spec: DatasetSpec, dataset_dir: str | Path) -> list[Path]:
    """The local files of a dataset: its `file_name`, or the supported files in that folder (sorted).

    Raises:
        SftflowError: the path is missing, the folder has no data file, or it mixes file types.
    """
    path = Path(dataset_dir) / spec.file_name
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_BUILDERS)
        if any(f.suffix == ".arrow" for f in files):  # a save_to_disk folder: skip its metadata json
            files = [f for f in files if f.name not in ("state.json", "dataset_info.json")]
    elif path.is_file():
        files = [path]
    else:
        raise SftflowError(
            f"{spec.where}: file {path} does not exist. Fix file_name in {spec.source} "
            f"(relative to dataset_dir {dataset_dir})."
        )
    if not files:
        raise SftflowError(f"{spec.where}: folder {path} has no {', '.join(FILE_BUILDERS)} files.")
    builders = {FILE_BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        raise SftflowError(
            f"{spec.where}: {path} has suffix {path.suffix!r}; supported: {', '.join(FILE_BUILDERS)}."
        )
    if len(builders) != 1:
        raise SftflowError(
            f"{spec.where}: folder {path} mixes file types; keep one of {', '.join(FILE_BUILDERS)}."
        )
    return files


def _read_json_rows(path: Path, where: str, skip_bad_rows: bool, count: DatasetCount) -> list[Any]:
    """Parse a .json/.jsonl file with Python's json module, naming the line of any syntax error.

    Used when the arrow reader fails (syntax errors, a column whose type changes between rows), so the
    user learns which line or row is at fault.
    """
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SftflowError(
                f"{where}: {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
                "Fix the file (a JSON array of objects, or one object per line in a .jsonl file)."
            ) from None
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            reason = f"line {lineno} of {path} is not valid JSON ({exc.msg} at column {exc.colno})"
            if not skip_bad_rows:
                raise SftflowError(
                    f"{where}: {reason}. Fix that line, or set skip_bad_rows: true to skip such lines."
                ) from None
            count.skipped += 1
            count.skip_reasons.append(reason)
    return rows


def image_dirs(data_args: DataArguments, path: Path | None = None) -> tuple[Path, ...]:
    """Where relative image paths are looked up: dataset_dir, then the data file's folder."""
    dirs = [Path(data_args.dataset_dir)]
    if path is not None and path.parent.resolve() != dirs[0].resolve():
        dirs.append(path.parent)
    return tuple(dirs)


def _convert_python_rows(
    rows: list[Any],
    spec: DatasetSpec,
    stage: Stage,
    where: str,
    skip_bad_rows: bool,
    count: DatasetCount,
    dirs: tuple[Path, ...] = (),
) -> Dataset:
    from datasets import Dataset

    converted, errors = [], []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise RowError(f"must be a JSON object, got {type(row).__name__}")
            converted.append(convert_row(row, spec.formatting, spec.columns, spec.tags, stage, dirs))
        except RowError as exc:
            errors.append(f"row {index}: {exc}")
    _handle_errors(errors, len(rows), where, skip_bad_rows, count)
    return Dataset.from_list(converted, features=features_for(stage))


def _handle_errors(
    errors: list[str], total: int, where: str, skip_bad_rows: bool, count: DatasetCount
) -> None:
    if not errors:
        return
    if not skip_bad_rows:
        shown = "\n  ".join(errors[:MAX_REPORTED_ROWS])
        more = (
            f"\n  ... and {len(errors) - MAX_REPORTED_ROWS} more" if len(errors) > MAX_REPORTED_ROWS else ""
        )
        raise SftflowError(
            f"{where}: {len(errors)} of {total} rows are malformed (rows counted from 0):\n  {shown}{more}\n"
            "Fix these rows (or map your column/role names in dataset_info.json), "
            "or set skip_bad_rows: true to skip them."
        )
    count.skipped += len(errors)
    count.skip_reasons += errors[:MAX_REPORTED_ROWS]


def _missing_columns(present: list[str], spec: DatasetSpec, stage: Stage) -> list[str]:
    if spec.formatting == "alpaca":
        required = [spec.columns["prompt"]]
        if stage in ("sft", "kto"):
            required.append(spec.columns["response"])
    else:
        required = [spec.columns["messages"]]
    if stage == "rm":
        required += [spec.columns["chosen"], spec.columns["rejected"]]
    if stage == "kto":
        required.append(spec.columns["kto_tag"])
    return [c for c in required if c not in present]


def _check_columns(present: list[str], spec: DatasetSpec, stage: Stage, where: str) -> None:
    missing = _missing_columns(present, spec, stage)
    if missing:
        raise SftflowError(
            f"{where}: column(s) {missing} not found; the data has {present}. "
            f'Map your column names under "columns" for {spec.name!r} in {spec.source or "dataset_info.json"} '
            f'(e.g. "columns": {{"prompt": "question", "response": "answer"}}).'
        )


def convert_dataset(
    raw: Dataset,
    spec: DatasetSpec,
    stage: Stage,
    where: str,
    data_args: DataArguments,
    count: DatasetCount,
    dirs: tuple[Path, ...] = (),
) -> Dataset:
    """Convert arrow rows to the common form (in `preprocessing_num_workers` processes); malformed rows
    stop the run listing the first ones, or are skipped and counted with `skip_bad_rows`."""
    from datasets import Value

    _check_columns(raw.column_names, spec, stage, where)
    features = features_for(stage).copy()
    features["error"] = Value("string")

    def convert(row: dict, index: int) -> dict:
        try:
            return {**convert_row(row, spec.formatting, spec.columns, spec.tags, stage, dirs), "error": ""}
        except RowError as exc:
            return {**_placeholder(stage), "error": f"row {index}: {exc}"}

    converted = raw.map(
        convert,
        with_indices=True,
        remove_columns=raw.column_names,
        features=features,
        num_proc=_num_proc(data_args, len(raw)),
        desc=f"Converting {spec.name}",
    )
    errors = [e for e in converted["error"] if e]
    _handle_errors(errors, len(raw), where, data_args.skip_bad_rows, count)
    if errors:
        converted = converted.filter(lambda e: not e, input_columns="error")
    return converted.remove_columns("error")


def _num_proc(data_args: DataArguments, rows: int) -> int | None:
    workers = data_args.preprocessing_num_workers
    return min(workers, rows) if workers and workers > 1 and rows > 1 else None


def _load_file(
    path: Path, spec: DatasetSpec, stage: Stage, data_args: DataArguments, count: DatasetCount
) -> Dataset:
    from datasets import load_dataset

    builder = FILE_BUILDERS[path.suffix]
    where = f"{spec.where}, file {path}"
    digest = file_digest(path)
    try:
        raw = load_dataset(
            builder, data_files=[str(path)], split="train", cache_dir=content_cache_dir(digest)
        )
        if file_digest(path) != digest:
            raise SftflowError(
                f"{where}: the file changed while it was read. Run again once nothing writes to it."
            )
    except SftflowError:
        raise
    except Exception as exc:  # datasets/pyarrow raise many types for malformed files
        if builder != "json":
            raise SftflowError(
                f"{where}: could not read it as {path.suffix[1:]} ({type(exc).__name__}: {exc}). "
                "Check the file is valid and has the same columns in every row."
            ) from None
        raw = None
    if raw is None:  # the arrow reader failed: re-read in Python to name the bad line, row and field
        skipped_before = count.skipped
        rows = _read_json_rows(path, where, data_args.skip_bad_rows, count)
        count.read += len(rows) + count.skipped - skipped_before
        if not isinstance(rows, list) or not rows:
            raise SftflowError(f"{where}: expected a non-empty JSON array of objects (or JSON lines).")
        if all(isinstance(r, dict) for r in rows):
            _check_columns(sorted({k for r in rows for k in r}), spec, stage, where)
        dirs = image_dirs(data_args, path)
        return _convert_python_rows(rows, spec, stage, where, data_args.skip_bad_rows, count, dirs)
    count.read += len(raw)
    if len(raw) == 0:
        raise SftflowError(f"{where}: the file holds no rows.")
    return convert_dataset(raw, spec, stage, where, data_args, count, image_dirs(data_args, path))


def _load_hub(spec: DatasetSpec, streaming: bool) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(
            spec.hf_hub_url, name=spec.subset, data_dir=spec.folder, split=spec.split, streaming=streaming
        )
    except Exception as exc:
        offline = any(
            os.environ.get(v, "").lower() in ("1", "true") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        hint = (
            "HF_HUB_OFFLINE is set, so the hub cannot be reached"
            if offline
            else "if this machine is offline, the hub cannot be reached"
        )
        raise SftflowError(
            f"{spec.where}: could not load {spec.hf_hub_url!r} (subset {spec.subset}, split {spec.split}) "
            f"from the Hugging Face hub: {type(exc).__name__}: {str(exc)[:300]}. Note: {hint}; download it "
            "once (huggingface-cli download --repo-type dataset ...) and register it with file_name instead."
        ) from None


def _stream(spec: DatasetSpec, stage: Stage, data_args: DataArguments) -> IterableDataset:
    """A streamed dataset converted on the fly; a malformed row stops the run (or is skipped) when met."""
    from datasets import load_dataset

    if spec.file_name:
        files = data_files(spec, data_args.dataset_dir)
        raw = load_dataset(
            FILE_BUILDERS[files[0].suffix], data_files=[str(f) for f in files], split="train", streaming=True
        )
    else:
        raw = _load_hub(spec, streaming=True)
    skipped = [0]
    dirs = image_dirs(data_args, files[0] if spec.file_name and len(files) == 1 else None)

    def convert(row: dict, index: int) -> dict:
        try:
            return {**convert_row(row, spec.formatting, spec.columns, spec.tags, stage, dirs), "_ok": True}
        except RowError as exc:
            if not data_args.skip_bad_rows:
                raise SftflowError(
                    f"{spec.where}: row {index}: {exc}. Fix it or set skip_bad_rows: true."
                ) from None
            skipped[0] += 1
            logger.warning("%s: skipped row %d (%d skipped so far): %s", spec.where, index, skipped[0], exc)
            return {**_placeholder(stage), "_ok": False}

    features = features_for(stage).copy()
    from datasets import Value

    features["_ok"] = Value("bool")
    converted = raw.map(convert, with_indices=True, remove_columns=raw.column_names, features=features)
    return converted.filter(lambda ok: ok, input_columns="_ok").remove_columns("_ok")


def load_dataset_by_name(
    name: str, data_args: DataArguments, seed: int, stage: Stage = "sft", report: LoadReport | None = None
) -> Dataset | IterableDataset:
    """Load one registered dataset in the common form of `stage`, with num_samples and max_samples applied.

    Raises:
        SftflowError: unknown name, missing/unreadable files, malformed rows (without skip_bad_rows), or
            no row left.
    """
    from datasets import concatenate_datasets

    spec = get_dataset_spec(name, data_args.dataset_dir, stage)
    count = DatasetCount()
    if report is not None:
        report.datasets[name] = count
    if data_args.streaming:
        dataset = _stream(spec, stage, data_args)
        if spec.num_samples:
            logger.warning("%s: num_samples is ignored with streaming.", spec.where)
        return dataset.take(data_args.max_samples) if data_args.max_samples else dataset
    if spec.file_name:
        parts = [
            _load_file(path, spec, stage, data_args, count)
            for path in data_files(spec, data_args.dataset_dir)
        ]
        dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    else:
        raw = _load_hub(spec, streaming=False)
        count.read = len(raw)
        dataset = convert_dataset(raw, spec, stage, spec.where, data_args, count, image_dirs(data_args))
    if count.skipped:
        logger.warning(
            "%s: skipped %d malformed rows of %d (skip_bad_rows), e.g.\n  %s",
            spec.where,
            count.skipped,
            count.read,
            "\n  ".join(count.skip_reasons[:MAX_REPORTED_ROWS]),
        )
    if len(dataset) == 0:
        raise SftflowError(f"{spec.where}: no usable rows ({count.skipped} skipped as malformed).")
    if spec.num_samples:
        dataset = dataset.select(sample_indices(len(dataset), spec.num_samples, seed))
    if data_args.max_samples:
        dataset = dataset.select(range(min(data_args.max_samples, len(dataset))))
    count.kept = len(dataset)
    logger.info("%s: %d examples", spec.where, len(dataset))
    return dataset


def sample_indices(size: int, num_samples: int, seed: int) -> list[int]:
    """`num_samples` row indices drawn without replacement (then with, when more than `size`), seeded.

    >>> sorted(sample_indices(3, 3, seed=0))
    [0, 1, 2]
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    indices = rng.permutation(size)[:num_samples].tolist()
    if num_samples > size:
        indices += rng.choice(size, num_samples - size).tolist()
    return indices


def load_conversations(
    names: list[str],
    data_args: DataArguments,
    seed: int,
    stage: Stage = "sft",
    report: LoadReport | None = None,
) -> Dataset | IterableDataset:
    """Load the named datasets and mix them with `mix_strategy` (seeded).

    concat: one after the other. interleave_under / interleave_over: draw from the datasets with
    `interleave_probs` until the first (under) or the last (over) is exhausted.
    """
    from datasets import concatenate_datasets, interleave_datasets

    parts = [load_dataset_by_name(name, data_args, seed, stage, report) for name in names]
    if len(parts) == 1:
        return parts[0]
    if data_args.mix_strategy == "concat":
        return concatenate_datasets(parts)
    stopping = "first_exhausted" if data_args.mix_strategy == "interleave_under" else "all_exhausted"
    return interleave_datasets(
        parts, probabilities=data_args.interleave_probs, seed=seed, stopping_strategy=stopping
    )


def split_train_eval(dataset: Dataset | IterableDataset, val_size: float, seed: int) -> tuple[Any, Any]:
    """Hold out `val_size` examples (a fraction, or a count when >= 1), seeded. A stream holds out its
    first `val_size` examples."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        count = int(val_size)
        return dataset.skip(count), dataset.take(count)
    test_size = int(val_size) if val_size >= 1 else val_size
    if isinstance(test_size, int) and test_size >= len(dataset):
        raise SftflowError(f"val_size={test_size} leaves no training data ({len(dataset)} examples).")
    if isinstance(test_size, float) and round(test_size * len(dataset)) < 1:
        raise SftflowError(
            f"val_size={test_size} of {len(dataset)} examples holds out nothing; raise it or give a count."
        )
    parts = dataset.train_test_split(test_size=test_size, seed=seed)
    return parts["train"], parts["test"]
