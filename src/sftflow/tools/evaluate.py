"""`sftflow eval`: lm-evaluation-harness on a tuned model and on its base (adapter left out), in process and
offline, with sftflow's local tasks (tools/eval_tasks/) and any task folder given with `include`.

Results go to `<run dir>/eval_harness.json`:
`{"tasks": [...], "tuned": {task: {metric: value}}, "base": {...}, "lm_eval_version", "limit", ...}`;
report.html shows the base-vs-tuned table from it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError
from sftflow.model.inference import load_for_inference

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from sftflow.config.parser import RunArgs

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "eval_tasks"
RESULT_FILE = "eval_harness.json"
PLACEHOLDER = "__TASK_DIR__"


def local_tasks() -> list[str]:
    """The names of the tasks sftflow ships (tools/eval_tasks/*.yaml)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _task_dir(include: list[str], into: Path) -> Path:
    """Copy the shipped tasks and `include` folders into `into`, the data paths made absolute."""
    for source in [TASKS_DIR, *map(Path, include)]:
        if not source.is_dir():
            raise SftflowError(f"include: {source} is not a folder of lm-eval task YAML files.")
        for path in source.iterdir():
            target = into / path.name
            if path.suffix in (".yaml", ".yml"):
                target.write_text(path.read_text().replace(PLACEHOLDER, str(source.resolve())))
            elif path.is_file():
                shutil.copy(path, target)
    return into


def _scores(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (metric keys like "acc,none" become "acc")."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        metrics = results["results"].get(task, {})
        out[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not key.startswith(("alias", "sample_len"))
        }
    return out


def run_harness(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    task_dir: Path,
    limit: int | None,
    batch_size: int,
) -> dict[str, Any]:
    """lm-eval's simple_evaluate on a loaded model (HFLM wraps it; nothing is downloaded)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SftflowError(
            f"--tasks: unknown task(s) {', '.join(unknown)}. Offline, sftflow eval runs local task YAMLs: "
            f"its own ({', '.join(local_tasks())}) and those in --include folders."
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0
    )


def evaluate(
    args: RunArgs,
    tasks: list[str],
    out_dir: Path,
    include: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    base: bool = True,
) -> dict[str, Any]:
    """Run `tasks` on the tuned model (base + adapter) and, with `base`, on the base model alone; write
    and return the results (also saved as `out_dir/eval_harness.json`).

    Raises:
        SftflowError: lm-eval is not installed, a task is unknown, or no adapter is set while `base` is
            asked (there is nothing to compare).
    """
    try:
        import lm_eval
    except ImportError:
        raise SftflowError("sftflow eval needs lm-evaluation-harness: pip install 'sftflow[eval]'.") from None

    if not tasks:
        raise SftflowError(f"--tasks is empty; try --tasks {local_tasks()[0]}.")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    has_adapter = bool(args.model.adapter_name_or_path)
    variants = {"tuned": args}
    if base and has_adapter:
        variants["base"] = replace(args, model=replace(args.model, adapter_name_or_path=None))
    result: dict[str, Any] = {
        "tasks": tasks,
        "model_name_or_path": args.model.model_name_or_path,
        "adapter_name_or_path": args.model.adapter_name_or_path,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "limit": limit,
    }
    with tempfile.TemporaryDirectory(prefix="sftflow-eval-") as tmp:
        task_dir = _task_dir(include or [], Path(tmp))
        for name, variant in variants.items():
            start = time.perf_counter()
            model, tokenizer = load_for_inference(variant)
            logger.info("lm-eval on the %s model: %s", name, ", ".join(tasks))
            raw = run_harness(model, tokenizer, tasks, task_dir, limit, batch_size)
            result[name] = _scores(raw, tasks)
            result[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
            result.setdefault(
                "samples", {t: raw.get("n-samples", {}).get(t, {}).get("effective") for t in tasks}
            )
            del model
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The results as a text table: task, metric, base, tuned.

    >>> print(format_table({"tasks": ["t"], "tuned": {"t": {"acc": 0.75}}, "base": {"t": {"acc": 0.25}}}))
    task  metric   base  tuned
    t     acc    0.2500 0.7500
    """
    rows = [("task", "metric", "base", "tuned")]
    for task in result["tasks"]:
        for metric, value in result["tuned"].get(task, {}).items():
            if metric.endswith("_stderr"):
                continue
            before = result.get("base", {}).get(task, {}).get(metric)
            rows.append((task, metric, "-" if before is None else f"{before:.4f}", f"{value:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}} {r[2]:>{widths[2]}} {r[3]:>{widths[3]}}" for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
