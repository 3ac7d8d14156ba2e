"""Command-line flags from the config dataclasses: one `--dashed-name` (and its `--underscore_name`
alias) per field, typed by the field, with the field's docstring as its help. Every script's
flags for a config come from here, so a new field is a new flag everywhere at once."""
import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types

from .config import ConfigError


def flag(name: str) -> list[str]:
    """--dashed-name and its underscore alias."""
    return [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (a string on the line after it)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {field.target.id: " ".join(doc.value.value.split())
            for field, doc in zip(body, body[1:])
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}


def _scalar(kind):
    """int for `int`, `int | None` and the like."""
    if isinstance(kind, types.UnionType):
        return next(k for k in kind.__args__ if k is not type(None))
    return kind


def add_fields(parser: argparse.ArgumentParser, cls, skip=(), **defaults):
    """A flag per field of the dataclass `cls`, except those in `skip`; `defaults` replace the
    dataclass's own. A bool field gets --name and --no-name."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        doc = docs.get(f.name, "").replace("%", "%%")
        kind = _scalar(f.type)
        if kind is bool:
            parser.add_argument(*flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=doc)
        else:
            parser.add_argument(*flag(f.name), dest=f.name, type=kind, default=default,
                                help=f"{doc} (default: {default})" if doc else f"(default: {default})")


def from_args(cls, args: argparse.Namespace, **fixed):
    """An instance of the dataclass `cls` from the parsed flags add_fields made, `fixed` on top."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **fixed})


def check(parser: argparse.ArgumentParser, cls, args: argparse.Namespace, **fixed):
    """from_args, with the dataclass's own checks (its __post_init__) as the parser's usage error,
    before anything is built."""
    try:
        return from_args(cls, args, **fixed)
    except ConfigError as e:
        parser.error(str(e))
