"""Command-line flags generated from config dataclasses (config.py's ServerConfig, Limits):
a field declares its option once, so a field added later gets its flag without more code.

The rule: field `name` -> `--name-in-kebab-case`, typed as the field (`int | None` as int),
its default the field's, its help and choices from the field's metadata; a bool becomes
`--name` / `--no-name`; a field without a default is a required flag; a "" default is
shown as None (and read back as ""); a field that is itself a dataclass contributes its
own fields, as a group. Metadata bends the rule where a flag predates it: `flag` (another
name; a bool's positive form), `to_cli` (the field's default as the flag shows it) and
`from_cli` (the flag's value as the field takes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def flag_name(field: dataclasses.Field) -> str:
    """The flag a field is set by on the command line."""
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _dest(field: dataclasses.Field) -> str:
    """The flag's attribute in argparse's namespace (auth_token_file, max_message_mb)."""
    return flag_name(field).removeprefix("--").replace("-", "_")


def leaf_fields(cls: type) -> list[dataclasses.Field]:
    """Every field that takes a flag: nested dataclasses' fields inlined."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        found += leaf_fields(kind) if dataclasses.is_dataclass(kind) else [field]
    return found


def _scalar(kind: Any) -> Any:
    """`int | None` -> int: the flag's type (None is only ever a default)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    return kind


def _add_flag(parser: Any, field: dataclasses.Field, kind: Any) -> None:
    kind = _scalar(kind)
    options: dict[str, Any] = {"help": field.metadata.get("help"), "dest": _dest(field)}
    if field.default is dataclasses.MISSING:
        options.update(required=True, default=argparse.SUPPRESS)
    else:
        options["default"] = field.metadata.get("to_cli", lambda value: value)(field.default)
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["type"] = kind
        if "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        else:
            options["metavar"] = _dest(field).upper()
    if "to_cli" not in field.metadata and options.get("default") == "":
        options["default"] = None  # shown as None, not as nothing; read back as ""
    parser.add_argument(flag_name(field), **options)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag for every field of `cls`; a nested dataclass's in a group of its own."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            add_flags(parser.add_argument_group(field.name, kind.__doc__), kind)
        else:
            _add_flag(parser, field, kind)


def _value(parser: argparse.ArgumentParser, field: dataclasses.Field, args: Any) -> Any:
    value = getattr(args, _dest(field))
    convert = field.metadata.get("from_cli")
    if convert is None:
        return "" if value is None and field.default == "" else value
    try:
        return convert(value)
    except (ValueError, OSError) as error:
        parser.error(f"argument {flag_name(field)}: {error}")


def _build(parser: argparse.ArgumentParser, cls: type, args: argparse.Namespace) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        nested = dataclasses.is_dataclass(kind)
        values[field.name] = _build(parser, kind, args) if nested else _value(parser, field, args)
    return cls(**values)


def config_from_args(parser: argparse.ArgumentParser, cls: type, args: argparse.Namespace) -> Any:
    """`cls` from the flags add_flags made. Its own checks refuse a bad value: the error
    (argparse's: exit 2, usage, no traceback) names the flag when the message starts with
    a field's name, as config.py's do."""
    try:
        return _build(parser, cls, args)
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        flags = {field.name: flag_name(field) for field in leaf_fields(cls)}
        parser.error(f"argument {flags[name]}: {error}" if name in flags else str(error))
