"""Command-line options generated from dataclass fields, so each option is written once.

A field is an option when its `metadata` holds `help`; the field gives the name (`--batch-size` for
`batch_size`), the type and the default. Optional metadata: `flag` (another flag name), `metavar`,
`choices` (a tuple, or a function returning one, looked up only when needed: registries such as the
encoder table import torch), `parse` (a function turning the text into the value), `action`, and
`old_names` (earlier names of the option, whose flags still work).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def option_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def old_names_of(f: dataclasses.Field) -> tuple[str, ...]:
    return tuple(f.metadata.get("old_names", ()))


def choices_of(f: dataclasses.Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def plain_type(cls, name: str) -> type:
    """The type of a field without its None (`int | None` -> int)."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


class ChoicesHelp(argparse.HelpFormatter):
    """Appends an option's choices to its help text when the help is shown (not at every start-up)."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        choices = getattr(action, "lazy_choices", None)
        return f"{text} (one of: {', '.join(choices())})" if choices else text


def add_options(parser, cls, *, checked_later: bool = False, prefix: str = "") -> None:
    """One argument per option field of `cls` (dest: prefix + field name).

    checked_later: the values stay text and unset options None (a later stage applies defaults, parses
    the text and checks choices, as ops.config does for every source alike); otherwise argparse gives the
    field's default, parses with `parse` (or the field's type) and checks the choices."""
    for f in option_fields(cls):
        meta, typ = f.metadata, plain_type(cls, f.name)
        kw: dict = {"dest": prefix + f.name, "help": meta["help"]}
        if typ is bool:
            kw["action"] = meta.get("action") or (argparse.BooleanOptionalAction if checked_later else "store_true")
        else:
            kw["metavar"] = meta.get("metavar")
            if not checked_later:
                kw["type"] = meta.get("parse", typ)
                kw["choices"] = choices_of(f)
        kw["default"] = None if checked_later else default_of(f)
        old_flags = ["--" + old.replace("_", "-") for old in old_names_of(f)]
        if old_flags:
            kw["help"] += f" (old name: {', '.join(old_flags)})"
        # checked later: an old flag keeps its own dest, so the later stage can notice the old name
        action = parser.add_argument(flag_of(f), *([] if checked_later else old_flags), **kw)
        for old, old_flag in zip(old_names_of(f), old_flags if checked_later else []):
            parser.add_argument(old_flag, **{**kw, "dest": prefix + old, "help": argparse.SUPPRESS})
        if checked_later and meta.get("choices") is not None:
            action.lazy_choices = lambda f=f: [str(c) for c in choices_of(f)]


def values_from(args: argparse.Namespace, cls, prefix: str = "") -> dict:
    """The option fields of `cls` as argparse parsed them, by field name; with checked_later options, also an
    old name that was given, by that name."""
    values = {f.name: getattr(args, prefix + f.name) for f in option_fields(cls)}
    given_old = {old: getattr(args, prefix + old, None) for f in option_fields(cls) for old in old_names_of(f)}
    return values | {old: value for old, value in given_old.items() if value is not None}
