"""The models of a run (the tuned one and the one it started from) for Chat and Export, and the pair of
chat engines the Chat tab streams from."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftflow.board import runs
from sftflow.config.parser import args_from_dict
from sftflow.errors import SftflowError
from sftflow.infer.engine import load_engine
from sftflow.infer.requests import SamplingParams

if TYPE_CHECKING:
    from sftflow.infer.engine import ChatEngine


RUN_ONLY_KEYS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint")


def base_keys(run_dir: str | Path) -> dict[str, Any]:
    """The keys of the model the run started from: the run's own config (train_config.yaml, the keys the
    user wrote; else sftflow_args.yaml) without the keys that only concern writing the run."""
    keys = runs.run_config(Path(run_dir))
    if not keys:
        raise SftflowError(f"{run_dir} holds no train_config.yaml or sftflow_args.yaml.")
    return {k: v for k, v in keys.items() if k not in RUN_ONLY_KEYS}


def tuned_keys(run_dir: str | Path) -> dict[str, Any]:
    """The keys of the tuned model: LoRA runs put their adapter (the run dir) after the adapters they
    started from (replacing the last one, which the run continued, unless create_new_adapter); full and
    freeze runs are the model in the run dir.

    Raises:
        SftflowError: the run dir holds no trained weights yet.
    """
    run_dir = Path(run_dir)
    keys = base_keys(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        given = keys.get("adapter_name_or_path") or []
        given = [a.strip() for a in given.split(",")] if isinstance(given, str) else list(given)
        kept = given if keys.get("create_new_adapter") else given[:-1]
        keys["adapter_name_or_path"] = ",".join([*kept, str(run_dir)])
    elif (run_dir / "config.json").is_file():
        keys["model_name_or_path"] = str(run_dir)
        keys.pop("adapter_name_or_path", None)
    else:
        raise SftflowError(
            f"{run_dir.name} holds no trained weights yet (no adapter_config.json or config.json): "
            "wait until it finishes."
        )
    return keys


class ChatPair:
    """The tuned model of one run and the model it started from, loaded once and kept for the page."""

    def __init__(self) -> None:
        self.run: Path | None = None
        self.tuned: Any = None
        self.base: Any = None
        self.lock = threading.Lock()

    def load(self, run_dir: Path) -> str:
        """Load the run's tuned model (its output dir) and its base (its config without this run's
        weights: the model_name_or_path and the adapters it started from).

        Raises:
            SftflowError: the run has no trained weights yet.
        """

        with self.lock:
            if self.run == run_dir:
                return f"loaded {run_dir.name}"
            self.close()
            tuned, base = tuned_keys(run_dir), base_keys(run_dir)
            self.tuned = load_engine(args_from_dict(tuned, require_output_dir=False))
            self.base = load_engine(args_from_dict(base, require_output_dir=False))
            self.run = run_dir
            return (
                f"loaded {run_dir.name}: tuned (left) and its base {base.get('model_name_or_path')} (right)"
            )

    def close(self) -> None:
        for engine in (self.tuned, self.base):
            if engine is not None:
                engine.close()
        self.run = self.tuned = self.base = None

    def stream_both(self, messages: list[dict[str, str]], max_new_tokens: int):
        """Yield (tuned text, base text) as both answers stream in, side by side."""

        if self.tuned is None:
            raise SftflowError("pick a run and press Load first.")
        params = SamplingParams(max_new_tokens=max_new_tokens)
        texts, done = ["", ""], [False, False]
        errors: list[str] = []

        def pump(i: int, engine: ChatEngine) -> None:
            try:
                stream, _ = engine.stream(messages, params)
                for piece in stream:
                    texts[i] += piece
            except SftflowError as exc:
                errors.append(str(exc))
            finally:
                done[i] = True

        threads = [
            threading.Thread(target=pump, args=(i, e), daemon=True)
            for i, e in enumerate((self.tuned, self.base))
        ]
        for thread in threads:
            thread.start()
        while not all(done):
            time.sleep(0.1)
            yield texts[0], texts[1]
        if errors:
            raise SftflowError(errors[0])
        yield texts[0], texts[1]
