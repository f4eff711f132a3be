"""Command-line flags from dataclass fields, and config files whose keys are those flags.

One builder serves ``drgrpo train``, ``eval`` and ``compare``: every field of a configuration
dataclass becomes a kebab-case flag whose help is the field's docstring, its type and choices
read from the annotation. A field can adjust its flag through ``dataclasses.field(metadata=...)``:

- ``flag``: the flag's name when it is not the field's (``rewards`` -> ``--reward``), or ``None``
  for a field that has no flag of its own (say where its values come from in ``via``);
- ``repeat``: the flag is given once per value (``--reward a --reward b``) instead of
  ``--reward-weights 1 0.5``;
- ``prefix``: for a nested dataclass, the prefix of its fields' flags (``task-``, ``tiny-``).

A config file (YAML or TOML) is a mapping from flag names, without the dashes, to values;
:func:`file_args` turns it into the argument list the same parser reads, so a file and the
command line are checked and converted alike, and flags on the command line override the file.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

NONE_WORDS = ("none", "None", "null")
"""What a flag of an optional type accepts for ``None``."""


@dataclass(frozen=True)
class Flag:
    """One flag: the field it sets and how argparse reads it."""

    name: str
    """Flag name without dashes, e.g. ``max-new-tokens``."""
    dest: str
    """``group.field`` where the value lands, e.g. ``train.max_new_tokens``, ``task.max_operand``."""
    field: str
    """The dataclass field."""
    help: str
    """The field's docstring."""
    kwargs: dict[str, Any]
    """argparse keyword arguments (type, choices, nargs, action)."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag_name(f: dataclasses.Field[Any], prefix: str = "") -> str:
    """The flag of a dataclass field, without dashes: ``max_new_tokens`` -> ``max-new-tokens`` (plus ``prefix``,
    ``task-`` for the fields of a nested TaskConfig), or the name in its ``flag`` metadata."""
    return prefix + f.metadata.get("flag", f.name.replace("_", "-"))


def check_finite_fields(config: Any, prefix: str = "") -> None:
    """Refuse NaN and infinity in every float field of the dataclass ``config`` (and in tuples of floats),
    with a ValueError naming the field's flag: ``--lr must be a finite number, got nan``.

    For a configuration's ``__post_init__``: ``train(TrainConfig(lr=math.nan))`` fails like ``--lr nan``.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"--{flag_name(f, prefix)} must be a finite number, got {v}")


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _converter(tp: Any, optional: bool, flag: str) -> tuple[Any, tuple[Any, ...] | None]:
    """(argparse ``type`` callable, choices or None) for a scalar annotation."""
    choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
    base: Any = type(choices[0]) if choices else tp
    if base not in (int, float, str):
        raise TypeError(f"flag --{flag}: no command-line form for the type {tp!r}")

    def convert(text: str) -> Any:
        if optional and text in NONE_WORDS:
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None

    convert.__name__ = base.__name__  # argparse names the type in its error message
    return convert, (tuple(choices) + ((None,) if optional else ())) if choices else None


def _kwargs(tp: Any, meta: typing.Mapping[str, Any], flag: str) -> dict[str, Any]:
    tp, optional = _optional(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is tuple:  # tuple[X, ...]: several values
        item, _ = _optional(typing.get_args(tp)[0])
        convert, choices = _converter(item, False, flag)
        kw: dict[str, Any] = {"type": convert, "metavar": flag.upper()}
        if meta.get("repeat"):
            kw["action"] = "append"
        else:
            kw["nargs"] = "+"
        if choices:
            kw["choices"] = choices
        return kw
    convert, choices = _converter(tp, optional, flag)
    kw = {"type": convert, "metavar": "{" + ",".join(map(str, choices)) + "}" if choices else flag.upper()}
    if choices:
        kw["choices"] = choices
    return kw


def flags_of(
    cls: type, group: str, prefix: str = "", skip: Sequence[str] = (), defaults: Any = None
) -> Iterator[tuple[Flag | None, Any, Any]]:
    """(flag, field, default value) for every field of ``cls``; nested dataclasses are walked too.

    A nested dataclass field ``task`` puts its fields in the group ``task`` with the flag prefix
    ``task-`` (or its ``prefix`` metadata), leaving out the fields named in its ``skip`` metadata.
    A field with ``metadata={"flag": None}`` yields
    ``(None, field, default)``: it has no flag of its own.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested_prefix = f.metadata.get("prefix", f.name.replace("_", "-") + "-")
            yield from flags_of(type(value), f.name, nested_prefix, f.metadata.get("skip", ()), value)
            continue
        if "flag" in f.metadata and f.metadata["flag"] is None:
            yield None, f, value
            continue
        name = flag_name(f, prefix)
        yield (
            Flag(name, f"{group}.{f.name}", f.name, docs.get(f.name, ""), _kwargs(hints[f.name], f.metadata, name)),
            f,
            value,
        )


def add_flags(
    parser: argparse._ActionsContainer,
    cls: type,
    group: str,
    *,
    default_text: str | None = None,
    skip: Sequence[str] = (),
    defaults: Any = None,
) -> list[Flag]:
    """Add one flag per field of ``cls`` (and of its nested dataclasses) to ``parser``; returns them.

    Values land in ``group.field`` only when given (``argparse.SUPPRESS``), so a missing flag leaves the
    field to the base configuration. ``default_text`` replaces the shown default (e.g. "the preset's").
    """
    added = []
    for flag, _, default in flags_of(cls, group, skip=skip, defaults=defaults):
        if flag is None:
            continue
        shown = default_text or (list(default) if isinstance(default, tuple) else default)
        help_text = f"{flag.help} (default: {shown})".replace("%", "%%")
        parser.add_argument(f"--{flag.name}", dest=flag.dest, default=argparse.SUPPRESS, help=help_text, **flag.kwargs)
        added.append(flag)
    return added


def given(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags given, grouped by the first part of their destination: ``{'train': {'lr': 1e-4}, ...}``."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." in key:
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = tuple(value) if isinstance(value, list) else value
    return groups


def nested_replace(config: Any, groups: dict[str, dict[str, Any]], group: str) -> Any:
    """``config`` with the given fields of ``group`` replaced, and its nested dataclasses from their groups."""
    changes = dict(groups.get(group, {}))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = nested_replace(value, groups, f.name)
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------- config files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or TOML (``.toml``) file as a mapping of flag names to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist (expected a YAML or TOML file)")
    text = path.read_text()
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {str(path)!r}: not valid TOML ({exc})") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {str(path)!r}: not valid YAML ({exc})") from None
    else:
        raise ValueError(f"--config {str(path)!r}: expected a .yaml, .yml or .toml file")
    if not isinstance(data, dict):
        raise ValueError(
            f"--config {str(path)!r}: expected a mapping of flag names to values, got {type(data).__name__}"
        )
    return data


def file_args(data: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """The argument list equivalent to a config mapping ``{flag name: value}`` for ``parser``.

    Keys are flag names without the leading dashes (``max-new-tokens``; ``max_new_tokens`` is accepted
    too). Raises ValueError naming the key for an unknown flag or a value of the wrong shape.
    """
    actions = {opt[2:]: a for a in parser._actions for opt in a.option_strings if opt.startswith("--")}
    args: list[str] = []
    for key, value in data.items():
        name = str(key).replace("_", "-")
        action = actions.get(name)
        if action is None or name in ("config", "help"):
            valid = ", ".join(sorted(k for k in actions if not k.startswith("no-") and k not in ("config", "help")))
            raise ValueError(f"{source}: unknown key {key!r} (not a flag of this command); valid keys: {valid}")
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ValueError(f"{source}: key {key!r} must be true or false, got {value!r}")
            args.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(action, argparse._AppendAction) or action.nargs == "+":
            values = value if isinstance(value, list) else [value]
            if not values:
                continue  # an empty list: the default
            if isinstance(action, argparse._AppendAction):
                for v in values:
                    args += [f"--{name}", _text(v)]
            else:
                args += [f"--{name}", *map(_text, values)]
        else:
            if isinstance(value, (list, dict)):
                raise ValueError(f"{source}: key {key!r} takes one value, got {value!r}")
            args += [f"--{name}", _text(value)]
    return args


def _text(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; when it holds ``--config FILE`` (any sub-command), the file's flags come first.

    Flags on the command line override the file's: the file is parsed alone, then the command line,
    and the given values of the second replace those of the first.
    """
    ns = parser.parse_args(argv)
    path = getattr(ns, "config", None)
    if not path:
        return ns
    source = f"--config {str(path)!r}"
    data = read_config_file(path)
    sub = _subparser(parser, ns)
    command = [ns.command] if getattr(ns, "command", None) else []
    file_argv = [*command, *file_args(data, sub, source)]

    def fail(message: str) -> NoReturn:  # a bad value in the file: a ValueError naming the file, not a usage exit
        raise ValueError(f"{source}: {message}")

    with _errors_raise(fail, parser, sub):
        from_file = parser.parse_args(file_argv)
    merged = vars(from_file)
    merged.update({k: v for k, v in vars(ns).items() if "." in k or k not in merged})
    return argparse.Namespace(**merged)


@contextlib.contextmanager
def _errors_raise(fail: Callable[[str], NoReturn], *parsers: argparse.ArgumentParser) -> Iterator[None]:
    """Within the block, argparse errors of ``parsers`` call ``fail`` instead of printing usage and exiting."""
    saved = [p.error for p in parsers]
    for p in parsers:
        p.error = fail  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        for p, error in zip(parsers, saved, strict=True):
            p.error = error  # type: ignore[method-assign]


def _subparser(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    command = getattr(ns, "command", None)
    if command is None:
        return parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    return parser


def config_flags(group_flags: Sequence[Flag], groups: dict[str, Any]) -> dict[str, Any]:
    """``{flag name: value}`` for every flag in ``group_flags``, read from the configs in ``groups``.

    ``groups`` maps a flag group (``train``, ``task``, ...) to the dataclass instance holding its values;
    tuples become lists. The inverse of :func:`file_args`: writing this mapping to a file and reading it
    back with ``--config`` gives the same configuration.
    """
    out: dict[str, Any] = {}
    for flag in group_flags:
        group, name = flag.dest.split(".", 1)
        if group not in groups:
            continue
        value = getattr(groups[group], name)
        out[flag.name] = list(value) if isinstance(value, tuple) else value
    return out
