"""Command-line flags generated from code, so they never drift from it.

* `add_config_flags`: one flag per `FairCalibConfig` field, named after the field with "_" -> "-"
  (``w_bits`` -> ``--w-bits``), typed from the field's annotation, its help text taken from the class
  docstring. Booleans get ``--act-order / --no-act-order``; optional fields accept ``none``; lists
  take several values. Unset flags keep the dataclass default (`config_from_args` passes only the
  given ones).
* `add_eval_flags`: one flag per keyword argument of `optimum_fair.eval.evaluate` that has a plain
  default (``num_prompts`` -> ``--num-prompts``; ``--eval-num-prompts`` on `quantize`, whose config
  flags already use names like ``--seq-len``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from enum import Enum
from typing import Any

from ..config import FairCalibConfig
from ..eval.evaluate import evaluate

CONFIG_SKIP = ("quant_method",)  # fixed for this package
EVAL_SKIP = ("teacher_traces", "return_traces")
_DOC_LINE = re.compile(r"^ {8}(\w+): (.*)$")
_DOC_CONT = re.compile(r"^ {12,}(\S.*)$")


def flag(name: str) -> str:
    """``w_bits`` -> ``--w-bits``."""
    return "--" + name.replace("_", "-")


def field_docs(cls: type) -> dict[str, str]:
    """{field: description} from the "    name: text" lines of a class docstring (continuations joined)."""
    docs: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        match = _DOC_LINE.match(line)
        if match:
            names, text = match.groups()
            current = names
            docs[current] = text.strip()
            continue
        cont = _DOC_CONT.match(line)
        if cont and current:
            docs[current] += " " + cont.group(1).strip()
        else:
            current = None
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, True) for ``X | None``; (tp, False) otherwise."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _optional(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _kwargs_for(tp: Any, default: Any, doc: str) -> dict[str, Any]:
    """argparse keyword arguments for one annotated field."""
    inner, optional = _unwrap_optional(tp)
    shown = default.value if isinstance(default, Enum) else default
    text = doc if "default" in doc.lower() else f"{doc} (default: {shown})"
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
    if inner is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif isinstance(inner, type) and issubclass(inner, Enum):
        kw.update(choices=[e.value for e in inner], metavar="{" + ",".join(e.value for e in inner) + "}")
    elif typing.get_origin(inner) is list:
        kw.update(nargs="*", metavar="NAME")
    elif inner in (int, float, str):
        kw.update(type=_optional(inner) if optional else inner, metavar=inner.__name__.upper())
    else:  # Any: names / paths on the command line
        kw.update(type=_optional(str) if default is None else str, metavar="NAME")
    return kw


def add_config_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Add one flag per FairCalibConfig field to ``parser``; returns the field names."""
    group = parser.add_argument_group("FairCalibConfig fields (see optimum_fair.FairCalibConfig)")
    hints, docs, names = typing.get_type_hints(FairCalibConfig), field_docs(FairCalibConfig), []
    for f in dataclasses.fields(FairCalibConfig):
        if f.name in CONFIG_SKIP:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(flag(f.name), dest=f.name, **_kwargs_for(hints[f.name], default,
                                                                    docs.get(f.name, f"FairCalibConfig.{f.name}")))
        names.append(f.name)
    return names


def config_from_args(args: argparse.Namespace, names: list[str], **overrides: Any):
    """FairCalibConfig from the flags that were given (others keep their defaults)."""
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    given.update(overrides)
    return FairCalibConfig(**given)


def add_eval_flags(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, str]:
    """One flag per plain keyword argument of `evaluate` (``prefix`` + name, e.g. ``--eval-seed`` where a
    config flag has the same name); returns {evaluate argument: argparse dest}."""
    group = parser.add_argument_group("evaluation (see optimum_fair.eval.evaluate)")
    docs, names = field_docs(evaluate), {}
    for p in inspect.signature(evaluate).parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.name in EVAL_SKIP:
            continue
        default = p.default
        if isinstance(default, tuple):
            kw = {"nargs": "+", "metavar": "NAME", "type": str}
        elif default is None:
            kw = {"type": int, "metavar": "INT"}
        else:
            kw = {"type": type(default), "metavar": type(default).__name__.upper()}
        shown = " ".join(default) if isinstance(default, tuple) else default
        text = f"{docs.get(p.name, p.name)} (default: {shown})".replace("%", "%%")
        dest = prefix + p.name
        group.add_argument(flag(dest), dest=dest, default=default, help=text, **kw)
        names[p.name] = dest
    return names
