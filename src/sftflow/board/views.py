"""What the board's panels show, computed from the saves dir (no gradio here: tested without a browser),
and who may open the board."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.board import runs
from sftflow.data.encode import IGNORE_INDEX
from sftflow.data.inspect import format_report, render_example, trained_spans
from sftflow.data.prepare import prepare
from sftflow.errors import SftflowError
from sftflow.model.loader import load_chat_tokenizer

if TYPE_CHECKING:
    from pandas import DataFrame
    from transformers import PreTrainedTokenizerBase

    from sftflow.config.parser import RunArgs


TOKEN_ENV = "SFTFLOW_BOARD_TOKEN"
LOG_TAIL_LINES = 40

# -- safety ------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def board_token(host: str, environ: dict[str, str] | None = None) -> str | None:
    """The login token for `host`: none on a loopback host without one; SFTFLOW_BOARD_TOKEN when set
    (gate.TokenGate then serves nothing but its login form until that token is given).

    Raises:
        SftflowError: a non-loopback host without SFTFLOW_BOARD_TOKEN (the board would be open to the
            network with no login).
    """
    token = (environ if environ is not None else os.environ).get(TOKEN_ENV, "")
    if not token:
        if is_loopback(host):
            return None
        raise SftflowError(
            f"refusing to serve on {host} with no login: anyone who can reach it could start runs. "
            f"Set {TOKEN_ENV} to a secret (the page then asks for that token before it shows anything), "
            "or keep the default --host 127.0.0.1."
        )
    return token


# -- pure helpers (tested without a browser) -----------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def runs_table(saves: Path) -> list[list[Any]]:
    rows = []
    for run in runs.list_runs(saves):
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in run.metrics.items())
        steps = f"{run.step}/{run.max_steps}" if run.max_steps else str(run.step)
        rows.append(
            [
                run.name,
                run.status,
                run.stage,
                run.model,
                ", ".join(run.datasets),
                steps,
                metrics,
                fmt_duration(run.duration_s),
                run.error or "",
            ]  # fmt: skip
        )
    return rows


TABLE_HEADERS = ["run", "status", "stage", "model", "datasets", "steps", "final metrics", "duration", "error"]


def curve_frame(series: dict[str, list[tuple[int, float]]], keys: dict[str, str]) -> Any:
    """A long DataFrame (step, value, series) of the `keys` series, named by `keys`' values."""
    import pandas as pd

    rows = [
        {"step": step, "value": value, "series": label}
        for key, label in keys.items()
        for step, value in series.get(key, [])
    ]
    return typed_frame(pd.DataFrame(rows, columns=["step", "value", "series"]))


def typed_frame(frame: DataFrame) -> Any:
    """Numeric step and value columns (an object column makes the chart's axes categorical)."""
    return frame.astype({"step": "int64", "value": "float64", "series": "str"})


def chart_value(frame: DataFrame) -> Any:
    """None for a chart with no points: a LinePlot first given an empty frame never draws its lines."""
    return frame if len(frame) else None


def overlay_frame(saves: Path, names: list[str], key: str) -> Any:
    """One curve (`loss` or `eval_loss`) of several runs in one DataFrame (series = run name)."""
    import pandas as pd

    rows = [
        {"step": step, "value": value, "series": name}
        for name in names
        for step, value in runs.curves(saves / name).get(key, [])
    ]
    return typed_frame(pd.DataFrame(rows, columns=["step", "value", "series"]))


def progress_markdown(run: runs.Run) -> str:
    lines = [f"**{run.name}**: {run.status}"]
    if run.max_steps:
        pct = 100 * run.step / run.max_steps
        lines.append(f"step {run.step} of {run.max_steps} ({pct:.0f}%)")
    else:
        lines.append(f"step {run.step}")
    if run.duration_s is not None:
        lines.append(f"elapsed {fmt_duration(run.duration_s)}")
    if run.eta_s is not None:
        lines.append(f"ETA {fmt_duration(run.eta_s)}")
    if run.metrics:
        lines.append(", ".join(f"{k} {v:.4g}" for k, v in run.metrics.items()))
    text = " · ".join(lines)
    if run.error:
        text += f"\n\n`{run.error}`"
    return text


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    path = run_dir / runs.LOG_FILE
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def fresh_output_dir(saves: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = saves / f"run-{stamp}", 1
    while path.exists():
        n += 1
        path = saves / f"run-{stamp}-{n}"
    return str(path)


def next_output_dir(saves: Path, wanted: Any = None) -> str:
    """`wanted` when it is a free dir inside `saves`, else a fresh run-<time> dir there."""
    if wanted:
        path = Path(str(wanted)).expanduser().resolve()
        free = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        if saves in path.parents and free:
            return str(wanted)
    return fresh_output_dir(saves)


def command_markdown(keys: dict[str, Any]) -> str:
    out = keys.get("output_dir") or "OUTPUT_DIR"
    return f"```\n{runs.train_command(Path(out) / runs.CONFIG_FILE)}\n```"


# -- the data browser ------------------------------------------------------------------------------

DATA_PAGE_SIZE = 5


def example_html(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], index: int, cutoff_len: int) -> str:
    """One tokenized example as the model sees it, trained tokens highlighted, with its token counts."""
    import html

    if "input_ids" not in row:  # preference pairs: the text view of `sftflow preview`
        return f"<pre>{html.escape(render_example(tokenizer, row, index, color=False))}</pre>"
    labels = row.get("labels", row["input_ids"])
    trained = sum(1 for t in labels if t != IGNORE_INDEX)
    n = len(row["input_ids"])
    mark = " · <b>at cutoff_len: truncated</b>" if n >= cutoff_len else ""
    body = "".join(
        f'<mark style="background:#c8f7c5">{html.escape(tokenizer.decode(ids))}</mark>'
        if is_trained
        else html.escape(tokenizer.decode(ids))
        for is_trained, ids in trained_spans(row["input_ids"], labels)
    )
    head = f"<div><b>example {index}</b>: {n} tokens, {trained} trained{mark}</div>"
    return f'{head}<pre style="white-space:pre-wrap">{body}</pre>'


def data_page(args: RunArgs, page: int, size: int = DATA_PAGE_SIZE) -> str:
    """A page of the run's training examples after the same data step as `sftflow train` (the tokenized
    cache included), then the counts: per dataset, truncated and dropped at cutoff_len."""
    import html

    tokenizer = load_chat_tokenizer(args.model, args.data)
    prepared = prepare(
        args.finetuning.stage, args.data, tokenizer, args.training.seed, args.training.do_train
    )
    shown = prepared.train if prepared.train is not None else prepared.eval
    if shown is None:
        return "<p>no examples.</p>"
    total = len(shown) if hasattr(shown, "__len__") else None
    start = max(page - 1, 0) * size
    rows = (
        [shown[i] for i in range(start, min(start + size, total))]
        if total is not None
        else list(shown.take(size))
    )
    pages = f" of {-(-total // size)}" if total else ""
    parts = [f"<p>page {page}{pages} ({total} examples; trained tokens highlighted)</p>"]
    parts += [example_html(tokenizer, row, start + i, args.data.cutoff_len) for i, row in enumerate(rows)]
    parts.append(f"<pre>{html.escape(format_report(prepared.meta))}</pre>")
    return "".join(parts)
