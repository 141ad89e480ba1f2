"""`report.html`: one self-contained page (images inline, no network) that says whether a run worked.

Written at the end of `sftflow train` and by `sftflow report OUTPUT_DIR` from the files a run leaves in
its output dir: sftflow_args.yaml (config), data_stats.json (the data step's counts and statistics),
trainer_log.jsonl and *.png (curves), all_results.json (metrics), generated_predictions.jsonl and
generated_predictions_base.jsonl (answers). It reads files only: no dataset is loaded or tokenized.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sftflow.config.parser import SFTFLOW_CLASSES, TRAINING_DEFAULTS
from sftflow.data.audit import DATA_STATS, read_stats
from sftflow.errors import SftflowError
from sftflow.infer.predict import read_answers, read_jsonl, read_pair_scores
from sftflow.tools.evaluate import RESULT_FILE
from sftflow.train.plotting import plot_losses

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
MAX_SAMPLES = 50
# the outcome first, the config last (it is what the board opens for a run)
SECTIONS = ("base-vs-tuned", "lm-eval", "curves", "samples", "metrics", "data", "config")
# PNGs the run writes (train.plotting) -> the logged series each draws
CURVES = {"training_loss.png": "loss", "training_eval_loss.png": "eval_loss", "training_reward.png": "reward"}
# outcome metrics shown as numbers when there is no base-vs-tuned comparison
OUTCOME = ("eval_loss", "eval_perplexity", "eval_accuracy", "predict_accuracy", "predict_margin")
RUN_FILES = (
    "all_results.json",
    "trainer_log.jsonl",
    "sftflow_args.yaml",
    "generated_predictions.jsonl",
    "training_loss.png",
)
PER_SECOND = ("runtime", "per_second")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d232a;padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #e3e7ec;padding-bottom:.3rem;margin-top:2.2rem}
.sub{color:#5b6673;margin-top:0}table{border-collapse:collapse;width:100%;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #dde2e8;padding:.35rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#137333;font-weight:600}.worse{color:#b3261e;font-weight:600}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.85rem;max-height:14rem;overflow:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:0 1.2rem}
figure{margin:.6rem 0}figure img{max-width:100%;border:1px solid #e3e7ec}figcaption{color:#5b6673;font-size:.85rem}
.note{color:#5b6673;font-style:italic}table.samples td:nth-child(2){width:34%}table.samples td:first-child{width:1.5rem}
"""


# ---------------------------------------------------------------------------------------------------
# Reading the run


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_config(output_dir: Path) -> dict[str, Any]:
    import yaml

    path = output_dir / "sftflow_args.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def base_vs_tuned(metrics: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(metric, base, tuned) for every predict_X that has a predict_base_X (timings left out).

    >>> base_vs_tuned({"predict_rouge-l": 60.5, "predict_base_rouge-l": 20.7, "predict_runtime": 3.0})
    [('rouge-l', 20.7, 60.5)]
    """
    rows = []
    for key, tuned in metrics.items():
        if not key.startswith("predict_") or key.startswith("predict_base_") or key.endswith(PER_SECOND):
            continue
        name = key[len("predict_") :]
        base = metrics.get(f"predict_base_{name}")
        if isinstance(base, (int, float)) and isinstance(tuned, (int, float)):
            rows.append((name, float(base), float(tuned)))
    return rows


def sample_rows(output_dir: Path, limit: int = MAX_SAMPLES) -> tuple[list[dict[str, str]], int]:
    """Held-out rows (`infer.predict.read_answers`): prompt, reference, base (None without) and tuned answers."""
    answers = read_answers(output_dir)
    rows = [
        {"prompt": r["prompt"], "reference": r["label"], "base": r.get("base"), "tuned": r["tuned"]}
        for r in answers[:limit]
    ]
    return rows, len(answers)


# ---------------------------------------------------------------------------------------------------
# HTML pieces


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def table(header: list[str], rows: list[list[Any]], numeric_from: int = 1, css: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i >= numeric_from else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def png_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def config_defaults() -> dict[str, Any]:
    """Every sftflow key's default (the HF training keys in sftflow_args.yaml are the ones a user set)."""

    out: dict[str, Any] = dict(TRAINING_DEFAULTS)
    for cls in SFTFLOW_CLASSES:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def config_section(config: dict[str, Any]) -> str:
    """The config, the keys that differ from sftflow's defaults first (in bold)."""
    if not config:
        return '<p class="note">no sftflow_args.yaml in the output dir.</p>'
    defaults = config_defaults()
    changed = [k for k in config if k not in defaults or defaults[k] != config[k]]
    rest = [k for k in config if k not in changed]
    cells = [[f"<b><code>{esc(k)}</code></b>", f"<b>{esc(fmt(config[k]))}</b>"] for k in changed]
    cells += [[f"<code>{esc(k)}</code>", esc(fmt(config[k]))] for k in rest]
    half = (len(cells) + 1) // 2  # two key/value columns: half the height
    rows = [cells[i] + (cells[i + half] if i + half < len(cells) else ["", ""]) for i in range(half)]
    note = f"<p>{len(changed)} keys differ from sftflow's defaults (in bold, first).</p>"
    return note + table(["key", "value", "key", "value"], rows, numeric_from=4)


def data_section(output_dir: Path, work_dir: Path) -> str:
    """The data step's counts and statistics, as the run wrote them to data_stats.json."""
    meta = read_stats(output_dir)
    train = meta.get("splits", {}).get("train")
    if not train:
        return f'<p class="note">no {DATA_STATS} in the output dir (a streamed or evaluation-only run).</p>'
    held_out = meta.get("splits", {}).get("eval", {}).get("examples", 0)
    rows = [
        [
            "examples per dataset",
            esc(", ".join(f"{k}: {v['kept']}" for k, v in meta.get("datasets", {}).items())),
        ],
        ["train / held out", f"{train['examples']} / {held_out}"],
        [
            "length in tokens (before cutoff_len)",
            esc(", ".join(f"{k} {v}" for k, v in train["full_length"].items())),
        ],
        ["trained tokens per example", esc(", ".join(f"{k} {v}" for k, v in train["trained"].items()))],
        [
            f"at cutoff_len {meta.get('cutoff_len')}",
            f"{train['truncated']} truncated, {train['dropped']} dropped",
        ],
        ["trained share of tokens", f"{train['trained_share']:.1%}"],
    ]
    if meta.get("stage") == "grpo":  # prompts only: nothing is trained from the data itself
        rows = [row for row in rows if "trained" not in row[0]]
        rows[2][0] = "prompt length in tokens"
        rows.append(
            [
                "duplicates",
                f"{train['duplicates']} exact, {train['conflicting']} prompts with differing columns",
            ]
        )
    elif "duplicates" in train:
        eot = ", ".join(meta.get("eot_tokens", []))
        rows += [
            [
                "duplicates",
                f"{train['duplicates']} exact, {train['conflicting']} prompts with differing answers",
            ],
            ["empty responses", str(train["empty_responses"])],
            [
                "end-of-turn token trained",
                f"{train['examples'] - train['eot_untrained']} of {train['examples']} ({esc(eot)})",
            ],
        ]
    return table(["", "training data"], rows, numeric_from=2) + png_tag(
        length_histogram(train["histogram"], meta.get("cutoff_len", 0), work_dir), "example lengths (tokens)"
    )


def length_histogram(hist: dict[str, list[int]], cutoff_len: int, work_dir: Path) -> Path:
    """A bar chart of the lengths histogram data_stats.json holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="#1f77b4")  # equal-width bins
    if edges and edges[-1] >= 0.5 * cutoff_len:
        ax.axvline(cutoff_len, color="#b3261e", linestyle="--", label=f"cutoff_len {cutoff_len}")
        ax.legend()
    ax.set_xlabel("tokens per example (before cutoff_len)")
    ax.set_ylabel("examples")
    ax.grid(alpha=0.3)
    path = work_dir / "lengths.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def curves_section(output_dir: Path, log: list[dict[str, Any]], work_dir: Path) -> str:
    """Every PNG the run wrote (loss curves drawn from trainer_log.jsonl when it wrote none); a series
    logged once is a number, not a one-dot chart."""

    pngs = sorted(output_dir.glob("*.png"), key=lambda p: (p.name != "training_loss.png", p.name))
    if not pngs and log:
        pngs = plot_losses(log, work_dir)
    single = []
    for png in list(pngs):
        points = [e for e in log if CURVES.get(png.name, "") in e]
        if png.name in CURVES and len(points) == 1:
            pngs.remove(png)
            key = CURVES[png.name]
            single.append(
                f"<p>{esc(key)}: {fmt(points[0][key])} (logged once, at step {points[0].get('step')}).</p>"
            )
    if not pngs and not single:
        return '<p class="note">no loss was logged.</p>'
    steps = [e for e in log if "loss" in e]
    note = ""
    if len(steps) > 1:
        first, last = steps[0], steps[-1]
        note = (
            f"<p>train loss {fmt(first['loss'])} at step {first.get('step')} &rarr; "
            f"{fmt(last['loss'])} at step {last.get('step')} ({len(steps)} logged points).</p>"
        )
    rewards = [e for e in log if "reward" in e and "loss" in e]
    if len(rewards) > 1:
        first, last = rewards[0], rewards[-1]
        note += (
            f"<p>mean reward {fmt(first['reward'])} at step {first.get('step')} &rarr; {fmt(last['reward'])} at "
            f"step {last.get('step')}.</p>"
        )
    return (
        note + "".join(single) + '<div class="grid">' + "".join(png_tag(p, p.name) for p in pngs) + "</div>"
    )


def metrics_section(metrics: dict[str, Any]) -> str:
    if not metrics:
        return '<p class="note">no all_results.json in the output dir.</p>'
    groups: dict[str, list[list[Any]]] = {}
    for key, value in metrics.items():
        group = key.split("_", 1)[0] if key.split("_", 1)[0] in ("train", "eval", "predict") else "run"
        groups.setdefault(group, []).append([f"<code>{esc(key)}</code>", esc(fmt(value))])
    return "".join(f"<h3>{esc(g)}</h3>" + table(["metric", "value"], rows) for g, rows in groups.items())


def base_vs_tuned_section(metrics: dict[str, Any]) -> str:
    """The outcome: base vs tuned scores, else the run's held-out metrics as numbers."""
    rows = base_vs_tuned(metrics)
    if not rows:
        outcome = [[f"<code>{esc(k)}</code>", esc(fmt(metrics[k]))] for k in OUTCOME if k in metrics]
        note = '<p class="note">predict did not run on both the base and the tuned model.</p>'
        return note + (table(["held-out metric", "value"], outcome) if outcome else "")
    out = []
    for name, base, tuned in rows:
        delta = tuned - base
        css = "better" if delta > 0 else "worse" if delta < 0 else ""
        out.append([esc(name), fmt(base), fmt(tuned), f'<span class="{css}">{delta:+.4g}</span>'])
    return (
        "<p>Scores on the held-out set (x100, higher is better), generated from the same prompts with the "
        "adapter disabled (base) and enabled (tuned).</p>" + table(["metric", "base", "tuned", "change"], out)
    )


def samples_section(output_dir: Path, limit: int = MAX_SAMPLES) -> str:
    """Held-out prompts with reference, base and tuned answers; for rm, the scored pairs."""
    pairs = read_pair_scores(output_dir)
    if pairs:
        header = ["#", "prompt", "chosen", "rejected", "chosen score", "rejected score"]
        body = [
            [
                str(i),
                f"<pre>{esc(p['prompt'])}</pre>",
                esc(fmt(p["chosen"])),
                esc(fmt(p["rejected"])),
                fmt(p["chosen_score"]),
                fmt(p["rejected_score"]),
            ]
            for i, p in enumerate(pairs[:limit])
        ]
        shown = f"the first {len(body)} of {len(pairs)}" if len(pairs) > len(body) else f"all {len(pairs)}"
        return f"<p>{shown} held-out pairs, scored.</p>" + table(header, body, 4, css="samples")
    rows, total = sample_rows(output_dir, limit)
    if not rows:
        return '<p class="note">no generated_predictions.jsonl in the output dir.</p>'
    has_base = rows[0]["base"] is not None
    header = ["#", "prompt", "reference", *(["base answer"] if has_base else []), "tuned answer"]
    body = []
    for i, row in enumerate(rows):
        cells = [str(i), f"<pre>{esc(row['prompt'])}</pre>", esc(row["reference"])]
        if has_base:
            cells.append(esc(row["base"]))
        cells.append(esc(row["tuned"]))
        body.append(cells)
    shown = f"the first {len(rows)} of {total}" if total > len(rows) else f"all {total}"
    return f"<p>{shown} held-out examples.</p>" + table(header, body, len(header), css="samples")


def lm_eval_section(output_dir: Path) -> str:
    """`sftflow eval`'s results (eval_harness.json): each task's metrics, base vs tuned."""

    result = read_json(output_dir / RESULT_FILE)
    if not result.get("tuned"):
        return f'<p class="note">no {RESULT_FILE}: run <code>sftflow eval {esc(output_dir)} --tasks T</code>.</p>'
    rows = []
    for task in result.get("tasks", []):
        for metric, tuned in result["tuned"].get(task, {}).items():
            if not metric.endswith("_stderr"):
                base = result.get("base", {}).get(task, {}).get(metric)
                rows.append([esc(task), esc(metric), "-" if base is None else fmt(base), fmt(tuned)])
    limit = f", at most {result['limit']} examples per task" if result.get("limit") else ""
    note = f"<p>lm-evaluation-harness {esc(result.get('lm_eval_version', '?'))}, in process{limit}.</p>"
    return note + table(["task", "metric", "base", "tuned"], rows, numeric_from=2)


# ---------------------------------------------------------------------------------------------------
# The page


def build_html(output_dir: Path) -> str:
    """The report page for the run in `output_dir`."""
    config = read_config(output_dir)
    metrics = read_json(output_dir / "all_results.json")
    log = read_jsonl(output_dir / "trainer_log.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts = [
            section("base-vs-tuned", "Outcome: base vs tuned model", base_vs_tuned_section(metrics)),
            section("lm-eval", "Evaluation (lm-eval)", lm_eval_section(output_dir)),
            section("curves", "Loss and eval curves", curves_section(output_dir, log, work)),
            section("samples", "Sample predictions", samples_section(output_dir)),
            section("metrics", "Final metrics", metrics_section(metrics)),
            section("data", "Data", data_section(output_dir, work)),
            section("config", "Config", config_section(config)),
        ]
    model = config.get("model_name_or_path", "?")
    method = config.get("finetuning_type", "?")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    headline = ""
    if "eval_loss" in metrics:
        headline += f" eval loss {fmt(metrics['eval_loss'])}."
    if rows := base_vs_tuned(metrics):
        name, base, tuned = next((r for r in rows if r[0] == "rouge-l"), rows[0])
        headline += f" {name}: base {fmt(base)} &rarr; tuned {fmt(tuned)}."
    nav = " · ".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>sftflow report: {esc(output_dir.name)}</title><style>{CSS}</style></head><body>\n"
        f'<h1>sftflow run report</h1>\n<p class="sub">{esc(output_dir.resolve())} &middot; '
        f"{esc(model)} &middot; {esc(method)} &middot; written {when}.{headline}</p>\n<nav>{nav}</nav>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_report(output_dir: str | Path) -> Path:
    """Write `report.html` into `output_dir` and return its path.

    Raises:
        SftflowError: `output_dir` is not a run's output dir.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise SftflowError(f"{output_dir} is not a directory; pass a run's output_dir.")
    if not any((output_dir / name).is_file() for name in RUN_FILES):
        raise SftflowError(
            f"{output_dir} holds none of {', '.join(RUN_FILES)}: is it the output_dir of a `sftflow train` run?"
        )
    path = output_dir / REPORT_NAME
    path.write_text(build_html(output_dir), encoding="utf-8")
    return path
