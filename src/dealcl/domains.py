"""The domain of every setting, declared next to its default, and the one validator that enforces it.

A setting is a dataclass field (a `RunConfig` field in runs/config.py, a method option in a
method's config dataclass). Its domain is declared with the default:

    rank: int | None = option(None, positive)          # None: the method's default
    dropout: float = option(0.1, in_range(0, 1, high_open=True))
    overlap_norm: str = option("l1", one_of("l1", "frobenius2", "fro2"))

`coerce` checks a value against the field's annotated type (accepting the text of a flag or a
`key=value` override); `check` then checks it against the declared domain. YAML files, flags and
`key=value` / `method.KEY=VALUE` overrides all go through `checked` (runs/config.py), so each
error is one line naming the key, the value and the domain:

    config key 'method.rank' must be positive, got 0

A field declared without a domain (a plain `x: int = 3`) is still type-checked. Checks that
involve several fields stay in the config's `validate()`. Nothing here imports torch: the CLI
checks every flag before torch is loaded.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError

# Integers beyond 64 bits overflow torch, numpy and every C library underneath: no setting needs one.
INT_LIMIT = 2**63 - 1


class Domain:
    """The values a setting may take. `requirement` completes "must …" in the error line."""

    requirement: str = "be any value"

    def contains(self, value: Any) -> bool:
        raise NotImplementedError


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Range(Domain):
    """A finite number, optionally bounded below and/or above (open or closed bounds)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def requirement(self) -> str:  # type: ignore[override]
        if self.high is None:
            if self.low is None:
                return "be a finite number"
            if self.low == 0:
                return "be positive" if self.low_open else "not be negative"
            return f"be {'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"be {'<' if self.high_open else '<='} {_number(self.high)}"
        return (f"be in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


@dataclass(frozen=True)
class OneOf(Domain):
    choices: tuple[Any, ...]

    @property
    def requirement(self) -> str:  # type: ignore[override]
        return "be one of " + ", ".join(map(str, self.choices))

    def contains(self, value: Any) -> bool:
        return value in self.choices


@dataclass(frozen=True)
class NonEmpty(Domain):
    """A string with a non-blank character, or a list of at least one such string."""

    @property
    def requirement(self) -> str:  # type: ignore[override]
        return "not be empty"

    def contains(self, value: Any) -> bool:
        if isinstance(value, str):
            return bool(value.strip())
        if isinstance(value, list):
            return bool(value) and all(isinstance(v, str) and v.strip() for v in value)
        return False


@dataclass(frozen=True)
class NameList(Domain):
    """A list of non-blank names, possibly empty (empty: none of them, as report_to=[])."""

    @property
    def requirement(self) -> str:  # type: ignore[override]
        return "be a list of names"

    def contains(self, value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)


@dataclass(frozen=True)
class Regexes(Domain):
    """A list of valid Python regular expressions (empty: none, which may mean something: GORP's
    empty `galore_targets` trains no full-rank weight)."""

    @property
    def requirement(self) -> str:  # type: ignore[override]
        return "be a list of valid regular expressions"

    def contains(self, value: Any) -> bool:
        if not isinstance(value, list):
            return False
        for pattern in value:
            try:
                re.compile(pattern)
            except (re.error, TypeError):
                return False
        return True


@dataclass(frozen=True)
class ExistingPath(Domain):
    """A path that exists now: a folder (`kind="dir"`), a file, or either."""

    kind: str = "dir"

    @property
    def requirement(self) -> str:  # type: ignore[override]
        return {"dir": "be an existing folder", "file": "be an existing file"}.get(self.kind, "be an existing path")

    def contains(self, value: Any) -> bool:
        if not isinstance(value, str) or not value or "\0" in value:
            return False
        try:
            path = Path(value).expanduser()
            return path.is_dir() if self.kind == "dir" else path.is_file() if self.kind == "file" else path.exists()
        except (OSError, ValueError):
            return False


# The domains most settings need.
positive = Range(0, None, low_open=True)
non_negative = Range(0, None)
finite = Range()
probability = Range(0, 1)
non_empty = NonEmpty()
name_list = NameList()
regexes = Regexes()
existing_dir = ExistingPath("dir")
existing_file = ExistingPath("file")
# Seeds: Python, numpy and torch generators all take [0, 2^32) without wrapping.
seed_value = Range(0, 2**32 - 1)
# Widths of matrices (LoRA rank, an MLP's hidden size): no model dealcl loads has a hidden size
# near 2^16, and a larger value can only exhaust memory before anything trains.
dimension = Range(1, 2**16)


def in_range(low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(low, high, low_open, high_open)


def at_least(low: float) -> Range:
    return Range(low, None)


def one_of(*choices: Any) -> OneOf:
    return OneOf(tuple(choices))


def option(default: Any = dataclasses.MISSING, domain: Domain | None = None, *,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING, **metadata: Any) -> Any:
    """A dataclass field whose domain is declared next to its default (a method option, a setting)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"domain": domain, **metadata})


def domain_of(spec: dataclasses.Field) -> Domain | None:
    return spec.metadata.get("domain")


# ---- the validator ---------------------------------------------------------------------------
def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_text(args[0]) + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        return f"list of {_type_text(item)}"
    if origin is dict:
        return "mapping"
    return {bool: "true/false", int: "integer", float: "number", str: "text"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`; accept strings from the command line."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"config key '{key}' must be true or false, got {_shown(value)}")
    if tp is int:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"config key '{key}' must be an integer, got {_shown(value)}")
        if abs(number) > INT_LIMIT:
            raise UserError(f"config key '{key}' must be an integer of at most 64 bits, got {_shown(value)}")
        return number
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' must be a number, got {_shown(value)}")
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:  # an integer past the float range
                raise UserError(f"config key '{key}' must be a number in the float range, got {_shown(value)}") from None
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}' must be a number, got {_shown(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}' must be a string, got {_shown(value)}")
    if origin is list:
        (item_type,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in (part.strip() for part in value.split(",")) if v]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {_shown(value)}")
        return [coerce(key, v, item_type) for v in value]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UserError(f"config key '{key}' must be a mapping, got {_shown(value)} (not valid YAML)") from None
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {_shown(value)}")
        key_type, value_type = typing.get_args(tp) or (str, Any)
        if value_type is Any:
            return dict(value)
        return {str(k): coerce(f"{key}.{k}", v, value_type) for k, v in value.items()}
    return value


def _shown(value: Any, limit: int = 80) -> str:
    """The value as the error line quotes it: repr, cut short (a line, not a page)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " …" + text[-2:]


def check(key: str, value: Any, domain: Domain | None) -> Any:
    """`value` if it lies in `domain` (None, the "not set" of an optional field, always does)."""
    if domain is None or value is None or domain.contains(value):
        return value
    raise UserError(f"config key '{key}' must {domain.requirement}, got {_shown(value)}")


def checked(key: str, value: Any, spec: dataclasses.Field, tp: Any) -> Any:
    """Type, then domain: what every layer of a config (YAML, flag, override) goes through."""
    return check(key, coerce(key, value, tp), domain_of(spec))


def check_fields(instance: Any, prefix: str = "") -> Any:
    """Every declared domain of a dataclass instance (defaults included) holds."""
    for spec in dataclasses.fields(instance):
        check(prefix + spec.name, getattr(instance, spec.name), domain_of(spec))
    return instance


# ---- the table in docs/RELIABILITY.md -------------------------------------------------------
def _default_text(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = spec.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def field_rows(config_class: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """(key, type, default, what it must be) for each field of a config dataclass."""
    hints = typing.get_type_hints(config_class)
    rows = []
    for spec in dataclasses.fields(config_class):
        if spec.name in skip:
            continue
        domain = domain_of(spec)
        tp = hints[spec.name]
        must = domain.requirement if domain is not None else "be true or false" if tp is bool else "(its type only)"
        rows.append((prefix + spec.name, _type_text(tp), _default_text(spec), must))
    return rows


def domains_markdown() -> str:
    """The domains table of docs/RELIABILITY.md: every RunConfig setting and every option of every
    registered method, from their declarations (imports the methods, hence torch)."""
    from .methods import REGISTRY, LoraOptions
    from .runs.config import RunConfig

    def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
        cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(f"`{cell(r[0])}`" if i == 0 else cell(c) for i, c in enumerate(r)) + " |" for r in rows]

    lines = ["Run settings (`RunConfig`: YAML key, `--flag` where it is one, `key=value`):", ""]
    lines += table(field_rows(RunConfig), ("key", "type", "default", "must"))
    lora = [spec.name for spec in dataclasses.fields(LoraOptions)]
    lines += ["", "LoRA options of every method built on `LoraOptions` (`method.KEY=VALUE`; null picks the "
              "method's default):", ""]
    lines += table(field_rows(LoraOptions, "method."), ("key", "type", "default", "must"))
    rows = []
    for name in sorted(REGISTRY):
        config_class = REGISTRY[name].config_class
        skip = tuple(lora) if issubclass(config_class, LoraOptions) else ()
        for key, kind, default, must in field_rows(config_class, "method.", skip):
            rows.append((name, key, kind, default, must))
    lines += ["", "Options of each method (besides the LoRA options):", ""]
    body = table([(f"{r[0]}", *r[1:]) for r in rows], ("method", "key", "type", "default", "must"))
    lines += body
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(domains_markdown(), end="")
