"""Runs under the saves dir, read from their output dirs only, and started as their own processes.

A run is an output dir holding any of: train_config.yaml (the config the board wrote, the one a CLI user
would write), sftflow_args.yaml (written by `sftflow train` at the end), trainer_log.jsonl (one line per
log step), all_results.json (final metrics) and board_status.json (pid and launches, written here).

Start writes train_config.yaml and launches `python -m sftflow.cli train train_config.yaml` in a new
session with its output in board_train.log, so the run outlives the page and the board. Stop sends
SIGTERM, on which sftflow saves a checkpoint and exits; Resume relaunches with resume_from_checkpoint=true.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftflow.config.parser import args_from_dict
from sftflow.errors import SftflowError
from sftflow.train.plotting import smooth

CONFIG_FILE = "train_config.yaml"
STATUS_FILE = "board_status.json"
LOG_FILE = "board_train.log"
LAUNCH_MARK = "=== sftflow board: launch "
RUN_MARKERS = (CONFIG_FILE, "sftflow_args.yaml", "trainer_log.jsonl")
MAX_DEPTH = 4  # saves/<model>/<method>/<name> as LLaMA-Factory lays it out, and shallower

# Popen objects of the runs this board process launched: polled so that finished children are reaped.
_CHILDREN: dict[int, subprocess.Popen] = {}

# trainer_log.jsonl keys shown as curves, with their chart titles.
CURVES = {
    "loss": "train loss",
    "eval_loss": "eval loss",
    "learning_rate": "learning rate",
    "grad_norm": "grad norm",
    "tokens_per_second": "tokens/s (non-pad)",
    "peak_memory_gb": "peak memory (GB)",
}
# all_results.json keys shown in the runs table, in this order, when present.
SUMMARY_METRICS = ("train_loss", "eval_loss", "eval_perplexity", "predict_rougeL", "predict_bleu-4")


@dataclass
class Run:
    """One run as its output dir shows it."""

    path: Path
    name: str  # the path relative to the saves dir
    status: str  # running | finished | failed | stopped | unknown (a CLI run with no result yet)
    stage: str
    model: str
    datasets: list[str]
    step: int
    max_steps: int
    metrics: dict[str, float]
    duration_s: float | None
    error: str | None = None  # the run's `sftflow error:` line (or last log line) when it failed
    pid: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far (running runs with a known step count only)."""
        if self.status != "running" or not self.step or not self.duration_s or self.max_steps <= self.step:
            return None
        return self.duration_s / self.step * (self.max_steps - self.step)


# -- reading ----------------------------------------------------------------------------------------


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of trainer_log.jsonl; a line being written right now (not yet valid JSON) is skipped."""
    path = run_dir / "trainer_log.jsonl"
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series from trainer_log.jsonl: each key of CURVES plus `loss_smoothed`."""
    log = read_log(run_dir)
    out: dict[str, list[tuple[int, float]]] = {}
    for key in CURVES:
        points = [
            (int(e["step"]), float(e[key]))
            for e in log
            if "step" in e and isinstance(e.get(key), (int, float)) and math.isfinite(e[key])
        ]
        if points:
            out[key] = points
    if "loss" in out:
        steps = [s for s, _ in out["loss"]]
        out["loss_smoothed"] = list(zip(steps, smooth([v for _, v in out["loss"]]), strict=True))
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_config(run_dir: Path) -> dict[str, Any]:
    """The keys the run was launched with: the board's train_config.yaml, else sftflow_args.yaml."""
    return read_yaml(run_dir / CONFIG_FILE) or read_yaml(run_dir / "sftflow_args.yaml")


def last_launch_log(run_dir: Path) -> str:
    """board_train.log from the last launch header on (one log holds every launch of the run)."""
    path = run_dir / LOG_FILE
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    cut = text.rfind(LAUNCH_MARK)
    return text[cut:] if cut >= 0 else text


def error_line(log: str) -> str | None:
    """The run's one `sftflow error:` line, else the last line of a traceback, else None."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("sftflow error:"):
            return line
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return None


def process_alive(status: dict[str, Any]) -> bool:
    """Whether the pid in board_status.json is still that run (same start time, not a zombie)."""
    import psutil

    pid = status.get("pid")
    if not isinstance(pid, int):
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = status.get("create_time")
        return created is None or abs(proc.create_time() - float(created)) < 1.0
    except psutil.Error:
        return False


def run_status(run_dir: Path) -> tuple[str, str | None]:
    """(status, error line): running while its process lives; else finished when all_results.json holds
    the train metrics, stopped after the graceful SIGTERM path, failed otherwise."""
    status = read_json(run_dir / STATUS_FILE)
    if status and process_alive(status):
        return "running", None
    results = read_json(run_dir / "all_results.json")
    if not status:  # a run made by the CLI: only its files tell
        if results:
            return "finished", None
        recent = (run_dir / "trainer_log.jsonl").is_file() and (
            time.time() - (run_dir / "trainer_log.jsonl").stat().st_mtime < 120
        )
        return ("running" if recent else "unknown"), None
    error = error_line(last_launch_log(run_dir))
    if error and "training stopped by SIG" in error:
        return "stopped", error
    if error:
        return "failed", error
    if results:
        return "finished", None
    if status.get("stop_requested"):  # SIGTERM before training began: no checkpoint was written
        return "stopped", "stopped before training began (no checkpoint); start it again"
    return "failed", "the run exited without results; see " + str(run_dir / LOG_FILE)


def read_run(run_dir: Path, saves: Path) -> Run:
    """A Run from `run_dir`'s files."""
    config = run_config(run_dir)
    log = read_log(run_dir)
    results = read_json(run_dir / "all_results.json")
    status, error = run_status(run_dir)
    last = log[-1] if log else {}
    datasets = config.get("dataset") or []
    if isinstance(datasets, str):
        datasets = [d.strip() for d in datasets.split(",") if d.strip()]
    duration = run_duration(run_dir, status, results, last)
    metrics = {k: results[k] for k in SUMMARY_METRICS if isinstance(results.get(k), (int, float))}
    return Run(
        path=run_dir,
        name=str(run_dir.relative_to(saves)) if run_dir != saves else run_dir.name,
        status=status,
        stage=str(config.get("stage", "sft")),
        model=str(config.get("model_name_or_path", "")),
        datasets=list(datasets),
        step=int(max((e.get("step", 0) for e in log), default=0)),
        max_steps=int(max((e.get("max_steps") or 0 for e in log), default=0) or config.get("max_steps") or 0),
        metrics=metrics,
        duration_s=float(duration) if duration is not None else None,
        error=error,
        pid=read_json(run_dir / STATUS_FILE).get("pid") if status == "running" else None,
        config=config,
    )


def run_duration(run_dir: Path, status: str, results: dict[str, Any], last: dict[str, Any]) -> float | None:
    """Training seconds over every launch: the earlier launches' (recorded at resume) plus this one's
    (train_runtime once finished, else the elapsed_s of its last log entry)."""
    launch = read_json(run_dir / STATUS_FILE)
    earlier = float(launch.get("earlier_s") or 0.0)
    if status == "finished" and isinstance(results.get("train_runtime"), (int, float)):
        return earlier + float(results["train_runtime"])
    log = run_dir / "trainer_log.jsonl"
    this_launch = not launch or (
        log.is_file() and log.stat().st_mtime >= float(launch.get("started_at") or 0)
    )
    if this_launch and isinstance(last.get("elapsed_s"), (int, float)):
        return earlier + float(last["elapsed_s"])
    return earlier or None


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_MARKERS)


def find_run_dirs(saves: Path) -> list[Path]:
    """Every run dir under `saves` (up to MAX_DEPTH deep; checkpoints and hidden dirs are not runs)."""
    found: list[Path] = []

    def walk(path: Path, depth: int) -> None:
        if is_run_dir(path):
            found.append(path)
            return
        if depth >= MAX_DEPTH:
            return
        for child in sorted(path.iterdir()):
            if child.is_dir() and not child.name.startswith((".", "checkpoint-")):
                walk(child, depth + 1)

    if saves.is_dir():
        walk(saves, 0)
    return found


def list_runs(saves: str | Path) -> list[Run]:
    """Every run under `saves`, newest first (by the last change to its files)."""
    saves = Path(saves)

    def changed(path: Path) -> float:
        times = []
        for p in path.iterdir():
            try:
                times.append(p.stat().st_mtime)
            except OSError:  # a file the run replaced meanwhile
                continue
        return max(times, default=0.0)

    return [read_run(p, saves) for p in sorted(find_run_dirs(saves), key=changed, reverse=True)]


# -- starting and stopping --------------------------------------------------------------------------


def train_command(config_path: str | Path, overrides: list[str] | None = None) -> str:
    """The `sftflow train` command a CLI user types for this run."""
    return " ".join(["sftflow", "train", str(config_path), *(overrides or [])])


def config_text(keys: dict[str, Any], config_path: Path) -> str:
    """train_config.yaml: headed by the command that runs it, the keys as a user writes them."""
    head = (
        f"# {train_command(config_path)}\n"
        "# written by sftflow board; overwrite_output_dir: true because this dir also holds the board's\n"
        "# status and log files (board_status.json, board_train.log)\n"
    )
    return head + yaml.safe_dump(keys, sort_keys=False, allow_unicode=True)


def _launch(
    run_dir: Path, config_path: Path, overrides: list[str], cwd: str, launches: int, earlier_s: float = 0.0
) -> int:
    import psutil

    log = (run_dir / LOG_FILE).open("a", encoding="utf-8")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log.write(f"{LAUNCH_MARK}{launches} at {stamp}: {train_command(config_path, overrides)} ===\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftflow.cli", "train", str(config_path), *overrides],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own session: closing the page or the board never stops it
    )
    log.close()
    _CHILDREN[proc.pid] = proc
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        created = None
    status = {
        "pid": proc.pid,
        "create_time": created,
        "started_at": time.time(),
        "launches": launches,
        "earlier_s": earlier_s,  # training seconds of the launches before this one
        "cwd": cwd,
        "command": train_command(config_path, overrides),
    }
    (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=1), encoding="utf-8")
    return proc.pid


def inside_saves(
    saves: str | Path, path: Any, key: str, cwd: str | Path | None = None, example: str = "my-run"
) -> Path:
    """`path` (relative to `cwd`) resolved as the OS will resolve it, `..` and symlinks followed: the dir
    the board may write, strictly inside `saves`.

    Raises:
        SftflowError: the resolved path is `saves` itself or outside it.
    """
    saves = Path(os.path.realpath(saves))
    given = Path(str(path)).expanduser()
    resolved = Path(os.path.realpath(Path(cwd or os.getcwd()) / given))
    if resolved == saves or saves not in resolved.parents:
        shown = f"{path} (resolved: {resolved})" if str(resolved) != str(path) else str(path)
        raise SftflowError(
            f"{key} {shown} is not inside the board's saves dir {saves}; the board writes only there. "
            f"Use e.g. {key}: {saves / example}."
        )
    return resolved


def start_run(saves: str | Path, keys: dict[str, Any], cwd: str | Path | None = None) -> Path:
    """Write `keys` as train_config.yaml into their output_dir (inside `saves`) and launch `sftflow train`
    on it, detached. The keys are checked as the CLI checks them first.

    Returns:
        The run's output dir.

    Raises:
        SftflowError: a key the CLI would refuse, an output_dir outside `saves`, or one already in use.
    """

    saves = Path(saves).resolve()
    keys = {k: v for k, v in keys.items() if k != "overwrite_output_dir"}
    args_from_dict(keys)  # the CLI's own checks (and its error messages) before anything starts
    run_dir = inside_saves(saves, keys["output_dir"], "output_dir", cwd)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SftflowError(
            f"output_dir {run_dir} already holds a run; choose another output_dir (or resume that run "
            "from the Runs tab)."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    keys = {**keys, "output_dir": str(run_dir), "overwrite_output_dir": True}
    config_path = run_dir / CONFIG_FILE
    config_path.write_text(config_text(keys, config_path), encoding="utf-8")
    _launch(run_dir, config_path, [], str(Path(cwd or os.getcwd()).resolve()), 1)
    return run_dir


def stop_run(run_dir: str | Path) -> None:
    """SIGTERM the run's process: sftflow finishes the step, saves a checkpoint and exits.

    Raises:
        SftflowError: the run is not running.
    """
    run_dir = Path(run_dir)
    status = read_json(run_dir / STATUS_FILE)
    if not status or not process_alive(status):
        raise SftflowError(f"{run_dir.name} is not running, so there is nothing to stop.")
    os.kill(int(status["pid"]), signal.SIGTERM)
    status["stop_requested"] = True
    (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=1), encoding="utf-8")


def resume_run(run_dir: str | Path) -> int:
    """Relaunch the run's train_config.yaml with resume_from_checkpoint=true (the latest complete
    checkpoint). Returns the new pid.

    Raises:
        SftflowError: the run is running, was not started by the board, or has no complete checkpoint.
    """
    from sftflow.train.checkpoints import complete_checkpoints

    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    status = read_json(run_dir / STATUS_FILE)
    if status and process_alive(status):
        raise SftflowError(f"{run_dir.name} is still running; stop it first.")
    if not config_path.is_file():
        raise SftflowError(
            f"{run_dir} has no {CONFIG_FILE}; resume a CLI run with its own command plus "
            "resume_from_checkpoint=true."
        )
    if not complete_checkpoints(run_dir)[0]:
        raise SftflowError(
            f"{run_dir.name} has no complete checkpoint to resume from (stop a run with Stop to save one, "
            "or set save_strategy: steps with save_steps)."
        )
    cwd = status.get("cwd") or os.getcwd()
    earlier = read_run(run_dir, run_dir.parent).duration_s or 0.0
    launches = int(status.get("launches", 1)) + 1
    return _launch(run_dir, config_path, ["resume_from_checkpoint=true"], cwd, launches, earlier)
