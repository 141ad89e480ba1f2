"""One value from YAML or a `key=value` string -> the field's annotated type, as HF means the value.

Keyword strings stay strings (`report_to: none`, `save_strategy: "no"`): a value becomes None only when
the field allows None and no string or keyword option takes it, and a boolean only where the type allows
one. A YAML 1.1 boolean (`save_strategy: no` reads as False) given to a keyword field becomes its word.
"""

from __future__ import annotations

import difflib
import enum
import json
import types
import typing
from typing import Any, Literal, Union

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "~"}  # YAML's spellings of null; "none" is also None where no string is allowed


def keywords(tp: Any) -> list[Any] | None:
    """The closed set of values of a Literal or Enum type (None for any other type).

    >>> keywords(Literal["a", "b"])
    ['a', 'b']
    """
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m.value for m in tp]
    return None


def _takes_string(tp: Any, value: str) -> bool:
    words = keywords(tp)
    return tp is str or (words is not None and value in words)


def _union(tp: Any, value: Any) -> Any:
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    nullable = len(options) < len(typing.get_args(tp))
    if value is None and nullable:
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if nullable and (
            word in _NULL or (word == "none" and not any(_takes_string(o, value) for o in options))
        ):
            return None
        if bool in options and word in _TRUE | _FALSE:
            return word in _TRUE
        # `Enum | str` (lr_scheduler_type, optim, save_strategy, ...): HF turns the string into the enum,
        # so the string must be one of its values
        enums = [o for o in options if keywords(o) is not None]
        if len(enums) == 1 and str in options and len(options) == 2 and not nullable:
            return coerce(enums[0], value)
        if "," in value and any(typing.get_origin(o) is list for o in options):
            return coerce(next(o for o in options if typing.get_origin(o) is list), value)
    for option in options:
        try:
            return coerce(option, value)
        except (ValueError, TypeError):
            continue
    raise ValueError(f"expected {type_name(tp)}, got {value!r}")


def coerce(tp: Any, value: Any) -> Any:
    """Convert `value` (from YAML or a `key=value` string) to the annotated type `tp`.

    Raises:
        ValueError: the value does not fit the type.

    >>> coerce(float, "1e-4"), coerce(list[str], "q_proj, v_proj"), coerce(int | None, "null")
    (0.0001, ['q_proj', 'v_proj'], None)
    >>> coerce(str | list[str] | None, "none"), coerce(Literal["no", "steps"], False)
    ('none', 'no')
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _union(tp, value)
    if tp is Any:
        return value
    words = keywords(tp)
    if words is not None:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a boolean
            for word in ("no", "false", "off") if not value else ("yes", "true", "on"):
                if word in words:
                    return word
        if isinstance(value, enum.Enum):
            value = value.value
        if value not in words:
            close = difflib.get_close_matches(str(value), [str(w) for w in words], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"expected one of {', '.join(map(str, words))}, got {value!r}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:
                number = float(value)  # 1e3
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML `resume_from_checkpoint: true`: keep the word, as on the CLI
            return str(value).lower()
        if isinstance(value, (int, float)):  # `hub_revision: 2`, `run_name: 1`
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    if origin is list:
        item_type = args[0] if args else Any
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"expected a list or a comma-separated string, got {value!r}")
        return [coerce(item_type, v) for v in items]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"expected a mapping or a JSON object, got {value!r}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return value
    if isinstance(tp, type) and tp is not object and not isinstance(value, tp):
        # a class no config value can be (accelerate's ParallelismConfig): only unset works
        raise ValueError(f"{tp.__name__} cannot be given in a config; leave it unset")
    return value


def type_name(tp: Any) -> str:
    """A short readable name for an annotation (`int | None`, `no | steps | epoch`)."""
    words = keywords(tp)
    if words is not None:
        return " | ".join(map(str, words))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
