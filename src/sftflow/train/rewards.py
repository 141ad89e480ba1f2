"""grpo's reward functions: the built-ins, loading your own (`module:function` or `path/to/file.py:function`,
as in Axolotl), and the checks that turn a bad reward into one clear error.

A reward function is called as TRL calls it: `f(prompts=..., completions=..., completion_ids=..., **columns)`
with one entry per completion in each list: `prompts` the rendered prompt text, `completions` the sampled
text (special tokens removed), `completion_ids` their token ids, and every extra column of the data (e.g.
`answer`) repeated for each completion of its prompt, plus TRL's `trainer_state`, `log_extra` and
`log_metric`. It returns one float per completion, or None where it does not apply.

Built-ins (settings in `reward_kwargs`):

- `answer_match`: 1.0 when the answer (the completion without its thought, stripped) equals the
  `answer_column` column (default `answer`), else 0.0.
- `normalized_match`: the same on the final answer (a `\\boxed{}` content, else the text after the last
  "answer:" / "answer is", else the whole answer), lowercased, without spaces, `$` or a trailing period;
  numbers compare as numbers ("1,000.0" matches "1000").
- `regex_match`: 1.0 when the answer contains a match of `regex` (anchor it with ^...$ to match whole).
- `think_format`: 1.0 when the completion is a thought in `think_open`/`think_close` (default the template's
  thinking tags, else <think>/</think>) followed by a non-empty answer.
- `overlong_penalty`: DAPO's soft overlong punishment: 0 up to max_completion_length - `overlong_buffer`
  tokens (default a quarter of it), then falling linearly to -1 at max_completion_length.
- `length_target`: 1.0 for an answer of `min_words` (default 1) to `target_words` (default 6) words,
  falling linearly to 0 at `max_words` (default 26); 0 for fewer than min_words.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import re
import sys
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sftflow.config.methods import REWARD_BUILTINS
from sftflow.data.thinking import split_thought
from sftflow.errors import SftflowError

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list[float | None]]

# keyword arguments TRL passes that are not data columns
TRL_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")


def text_of(completion: Any) -> str:
    """A completion's text: sftflow passes text; TRL's conversational form is a list of messages.

    >>> text_of("4"), text_of([{"role": "assistant", "content": "4"}])
    ('4', '4')
    """
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def answer_text(completion: Any, words: tuple[str, str]) -> str:
    """The completion without its thought, stripped.

    >>> answer_text("<think>\\nhm\\n</think>\\n\\n 4 ", ("<think>", "</think>"))
    '4'
    """
    return split_thought(text_of(completion), words)[1].strip()


def final_answer(text: str) -> str:
    r"""The final answer of a text: the last \boxed{} content, else what follows the last "answer:" /
    "answer is", else the whole text.

    >>> final_answer(r"so \boxed{42}."), final_answer("The answer is 7."), final_answer("4")
    ('42', ' 7.', '4')
    """
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1]
    parts = re.split(r"answer(?:\s*:|\s+is\b)", text, flags=re.IGNORECASE)
    return parts[-1] if len(parts) > 1 else text


def normalize(text: str) -> str:
    """Lowercase, no spaces, `$` or trailing period; a number in canonical form.

    >>> normalize(" $1,000.0. "), normalize("Paris"), normalize("1/2")
    ('1000', 'paris', '1/2')
    """
    text = re.sub(r"[\s$]", "", text.strip().lower()).rstrip(".")
    number = text.replace(",", "")
    if re.fullmatch(r"[-+]?\d+(\.\d+)?", number):
        value = float(number)
        return str(int(value)) if value.is_integer() else repr(value)
    return text


def column(kwargs: dict[str, Any], name: str, reward: str) -> list[Any]:
    """The data column `name` a built-in reads.

    Raises:
        SftflowError: the data has no such column.
    """
    if name not in kwargs:
        columns = sorted(k for k in kwargs if k not in TRL_KWARGS)
        raise SftflowError(
            f"reward {reward} reads column {name!r}, which the data does not have (columns: {columns}). Add it "
            f"to the data, or set reward_kwargs.answer_column to the column holding the reference answer."
        )
    return kwargs[name]


def words_of(text: str) -> int:
    return len(text.split())


def length_score(n: int, target: float, limit: float, low: float) -> float:
    """1 for `low` to `target` words, falling linearly to 0 at `limit`; 0 below `low`.

    >>> [length_score(n, 6, 26, 1) for n in (0, 3, 6, 16, 26, 40)]
    [0.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    """
    if n < low:
        return 0.0
    if n <= target:
        return 1.0
    return max(0.0, (limit - n) / (limit - target))


def overlong_score(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment of a completion of `length` tokens.

    >>> [overlong_score(n, 32, 8) for n in (10, 24, 28, 32)]
    [0.0, 0.0, -0.5, -1.0]
    """
    start = max_length - buffer
    if length <= start:
        return 0.0
    return max(-1.0, (start - length) / buffer)


def builtin_rewards(
    settings: dict[str, Any], max_completion_length: int, words: tuple[str, str]
) -> dict[str, RewardFunc]:
    """The built-in reward functions with the run's settings (`reward_kwargs`)."""
    answer_column = settings.get("answer_column", "answer")
    open_word = settings.get("think_open", words[0])
    close_word = settings.get("think_close", words[1])
    regex = re.compile(settings.get("regex") or "(?!)")
    buffer = int(settings.get("overlong_buffer", max(1, max_completion_length // 4)))
    target = float(settings.get("target_words", 6))
    limit = float(settings.get("max_words", 26))
    low = float(settings.get("min_words", 1))
    think = re.compile(rf"^\s*{re.escape(open_word)}.*?{re.escape(close_word)}\s*\S", re.DOTALL)

    def answer_match(completions: list[str], **kwargs: Any) -> list[float]:
        refs = column(kwargs, answer_column, "answer_match")
        return [
            float(answer_text(c, words) == str(r).strip()) for c, r in zip(completions, refs, strict=True)
        ]

    def normalized_match(completions: list[str], **kwargs: Any) -> list[float]:
        refs = column(kwargs, answer_column, "normalized_match")
        return [
            float(normalize(final_answer(answer_text(c, words))) == normalize(str(r)))
            for c, r in zip(completions, refs, strict=True)
        ]

    def regex_match(completions: list[str], **kwargs: Any) -> list[float]:
        return [float(regex.search(answer_text(c, words)) is not None) for c in completions]

    def think_format(completions: list[str], **kwargs: Any) -> list[float]:
        return [float(think.match(text_of(c)) is not None) for c in completions]

    def overlong_penalty(
        completions: list[str], completion_ids: list[list[int]], **kwargs: Any
    ) -> list[float]:
        return [overlong_score(len(ids), max_completion_length, buffer) for ids in completion_ids]

    def length_target(completions: list[str], **kwargs: Any) -> list[float]:
        return [length_score(words_of(answer_text(c, words)), target, limit, low) for c in completions]

    functions = [answer_match, normalized_match, regex_match, think_format, overlong_penalty, length_target]
    built = {f.__name__: f for f in functions}
    assert set(built) == set(REWARD_BUILTINS), "config/methods.py REWARD_BUILTINS and the built-ins differ"
    return built


def import_reward(name: str) -> RewardFunc:
    """Your reward function `module:function` (imported from the working dir or sys.path) or
    `path/to/file.py:function`.

    Raises:
        SftflowError: the module or file cannot be imported, or has no such callable.
    """
    module_name, _, function = name.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            spec = importlib.util.spec_from_file_location(f"sftflow_reward_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything at import
        raise SftflowError(
            f"reward_funcs: {name!r}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from None
    func = getattr(module, function, None)
    if not callable(func):
        found = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise SftflowError(
            f"reward_funcs: {name!r}: {module_name} has no function {function!r} (its functions: {found[:12]})"
        )
    return func


def excerpt(text: Any, limit: int = 60) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


class CheckedReward:
    """A reward function whose failures stop the run naming the function and the completion: it raised
    (the failing completion found by calling it on each one alone), or returned the wrong number of
    values, or a value that is not a finite number or None."""

    def __init__(self, name: str, func: RewardFunc) -> None:
        self.name = name
        self.func = func
        self.__name__ = name.rpartition(":")[2]

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        try:
            values = self.func(prompts=prompts, completions=completions, **kwargs)
        except SftflowError:
            raise
        except Exception as exc:  # noqa: BLE001 - any error of the user's function is reported the same way
            raise self.failure(exc, prompts, completions, kwargs) from exc
        try:
            values = list(values)
        except TypeError:
            raise SftflowError(
                f"reward {self.name} returned {type(values).__name__} {excerpt(values)}, not a list of one number "
                f"per completion ({len(completions)}). Return a list of floats (None where it does not apply)."
            ) from None
        if len(values) != len(completions):
            raise SftflowError(
                f"reward {self.name} returned {len(values)} values for {len(completions)} completions; return "
                "one number (or None) per completion."
            )
        for i, value in enumerate(values):
            number = isinstance(value, Real) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0)
            if value is not None and (not number or not math.isfinite(float(value))):
                raise SftflowError(
                    f"reward {self.name} returned {excerpt(value)} ({type(value).__name__}) for completion {i} of the "
                    f"batch (prompt {excerpt(prompts[i])}, completion {excerpt(completions[i])}); each value must be "
                    "a finite number, or None where the reward does not apply."
                )
        return [None if v is None else float(v) for v in values]

    def failure(
        self, exc: Exception, prompts: list[Any], completions: list[Any], kwargs: dict[str, Any]
    ) -> SftflowError:
        """The error for a raising reward, naming the first completion it fails on alone."""
        row = None
        for i in range(len(completions)):
            one = {
                k: (v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v)
                for k, v in kwargs.items()
            }
            try:
                self.func(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **one)
            except Exception:  # noqa: BLE001
                row = i
                break
        where = (
            f" on completion {row} of the batch (prompt {excerpt(prompts[row])}, completion "
            f"{excerpt(completions[row])})"
            if row is not None
            else " on the batch (no single completion fails alone)"
        )
        return SftflowError(
            f"reward {self.name} raised {type(exc).__name__}: {exc}{where}. Fix the function."
        )


def load_rewards(
    names: list[str], settings: dict[str, Any] | None, max_completion_length: int, words: tuple[str, str]
) -> list[CheckedReward]:
    """The run's reward functions, checked, in reward_funcs order (before anything heavy loads).

    Raises:
        SftflowError: a name cannot be imported.
    """
    builtins = builtin_rewards(settings or {}, max_completion_length, words)
    return [
        CheckedReward(name, builtins[name] if name in builtins else import_reward(name)) for name in names
    ]


class RewardSpreadCallback(TrainerCallback):
    """Warn when every group's rewards have been equal (TRL's frac_reward_zero_std = 1) for `patience`
    steps: all advantages are 0, so the run learns nothing. Once per flat stretch."""

    def __init__(self, patience: int = 10) -> None:
        self.patience = patience
        self.flat_since: int | None = None
        self.warned = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        share = (logs or {}).get("frac_reward_zero_std")
        if share is None:
            return
        if share < 0.999:
            self.flat_since, self.warned = None, False
            return
        if self.flat_since is None:
            self.flat_since = max(0, state.global_step - max(1, int(args.logging_steps or 1)))
        if not self.warned and state.global_step - self.flat_since >= self.patience:
            self.warned = True
            logger.warning(
                "steps %d-%d: every completion of each prompt got the same reward (reward %.3g), so every "
                "advantage is 0 and the run learns nothing. Make the reward graded (partial credit), raise "
                "num_generations or temperature, or use easier prompts.",
                self.flat_since + 1,
                state.global_step,
                (logs or {}).get("reward", float("nan")),
            )
