"""Command-line flags from dataclass fields, and config files whose keys are those flags.

One builder serves ``drgrpo train``, ``eval`` and ``compare`` (:func:`add_flags`): every field of a configuration
dataclass becomes a kebab-case flag whose help is the field's docstring (:func:`help_text`), its type and choices
read from the annotation, adjusted by ``dataclasses.field(metadata=...)`` (``flag``, ``repeat``, ``prefix``,
``required``). :func:`parse_with_config` reads ``--config FILE`` (YAML or TOML) with the same parser, the command
line overriding it. It imports nothing of drgrpo, so the run's modules and the command line share it. The metadata
keys and how field docstrings are written: docs/design.md, section 9.14.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import itertools
import json
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

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
    owner: type
    """The dataclass that holds the field (``TaskConfig`` for ``--task-max-operand``)."""
    help: str
    """The field's docstring as help: cross-references to fields written as their flags."""
    kwargs: dict[str, Any]
    """argparse keyword arguments (type, choices, nargs, action)."""
    top: str
    """The field of the outermost dataclass the flag comes from: ``task`` for --task-max-operand, ``warm_start``
    for --tiny-hidden-size, the field itself for a flag of its own."""


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


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _converter(tp: Any, optional: bool, flag: str) -> tuple[Any, tuple[Any, ...] | None]:
    """(argparse ``type`` callable, choices or None) for a scalar annotation.

    The callable checks the choices itself, so a bad value's message lists them as a user types them
    (``none`` included for an optional field), not as Python writes them.
    """
    choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
    base: Any = type(choices[0]) if choices else tp
    if base not in (int, float, str):
        raise TypeError(f"flag --{flag}: no command-line form for the type {tp!r}")

    def convert(text: str) -> Any:
        if optional and text in NONE_WORDS:
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_TYPE_WORDS[base]}, got {text!r}") from None
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(_choice_words(choices, optional))})"
            )
        return value

    convert.__name__ = base.__name__  # argparse names the type in its error message
    return convert, tuple(choices) if choices else None


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}


def _choice_words(choices: Sequence[Any], optional: bool) -> list[str]:
    return [str(c) for c in choices] + (["none"] if optional else [])


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
        return kw
    convert, choices = _converter(tp, optional, flag)
    metavar = "{" + ",".join(_choice_words(choices, optional)) + "}" if choices else flag.upper()
    return {"type": convert, "metavar": metavar}


def flag_name(f: dataclasses.Field[Any], prefix: str = "") -> str | None:
    """The flag of field ``f`` without dashes (its ``flag`` metadata or its kebab-case name), or None."""
    if "flag" in f.metadata and f.metadata["flag"] is None:
        return None
    return prefix + f.metadata.get("flag", f.name.replace("_", "-"))


CROSS_REFERENCE = re.compile(r"``([a-z][a-z0-9_]*)``")
"""A reference to another field in a field docstring: ``clip_high``."""


def help_text(doc: str, flags: Mapping[str, str]) -> str:
    """A field docstring as the help of its flag: each ``field`` of the same dataclass becomes its flag.

    ``flags`` maps field names to flag names without dashes. Any other markup is left as written, where
    the help test finds it.
    """
    return CROSS_REFERENCE.sub(lambda m: f"--{flags[m.group(1)]}" if m.group(1) in flags else m.group(0), doc)


def flags_of(
    cls: type, group: str, prefix: str = "", skip: Sequence[str] = (), defaults: Any = None, top: str | None = None
) -> Iterator[tuple[Flag | None, Any, Any]]:
    """(flag, field, default value) for every field of ``cls``; nested dataclasses are walked too.

    A nested dataclass field ``task`` puts its fields in the group ``task`` with the flag prefix
    ``task-`` (or its ``prefix`` metadata), leaving out the fields named in its ``skip`` metadata.
    A field with ``metadata={"flag": None}`` yields
    ``(None, field, default)``: it has no flag of its own. ``top`` is the outer field ``cls`` is nested in (None:
    ``cls`` is the outermost).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls() if defaults is None else defaults
    fields = [f for f in dataclasses.fields(cls) if not _nested(getattr(defaults, f.name))]  # type: ignore[arg-type]
    names = {f.name: name for f in fields if (name := flag_name(f, prefix)) is not None}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        value = getattr(defaults, f.name)
        if _nested(value):
            nested_prefix = f.metadata.get("prefix", f.name.replace("_", "-") + "-")
            skipped = f.metadata.get("skip", ())
            yield from flags_of(type(value), f.name, nested_prefix, skipped, value, top or f.name)
            continue
        if f.name not in names:
            yield None, f, value
            continue
        name = names[f.name]
        doc = help_text(docs.get(f.name, ""), names)
        kwargs = _kwargs(hints[f.name], f.metadata, name)
        yield Flag(name, f"{group}.{f.name}", f.name, cls, doc, kwargs, top or f.name), f, value


def _nested(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def add_flags(
    parser: argparse._ActionsContainer,
    cls: type,
    group: str,
    *,
    default_text: str | None = None,
    unset_text: str | None = None,
    skip: Sequence[str] = (),
    defaults: Any = None,
    note: Callable[[str], str | None] | None = None,
) -> list[Flag]:
    """Add one flag per field of ``cls`` (and of its nested dataclasses) to ``parser``; returns them.

    Values land in ``group.field`` only when given (``argparse.SUPPRESS``), so a missing flag leaves the
    field to the base configuration. Each help ends with ``(default: ...)``: ``default_text`` for every
    flag when given (e.g. "the preset's"), else the field's default in words (:func:`default_words`), or
    ``unset_text`` for a default of ``None`` or empty (else nothing: the docstring says what happens).
    ``note(top)``, when given, is a sentence the help ends with, from the field of ``cls`` the flag comes from
    (:attr:`Flag.top`; ``drgrpo train`` says there what a resume does with a new value), or None for none.
    """
    added = []
    for flag, f, default in flags_of(cls, group, skip=skip, defaults=defaults):
        if flag is None:
            continue
        required = f.metadata.get("required", False)
        shown = None if required else default_text or default_words(default) or unset_text
        text = flag.help + (f" (default: {shown})" if shown else "")
        extra = note(flag.top) if note else None
        text += f" {extra}" if extra else ""
        parser.add_argument(
            f"--{flag.name}", dest=flag.dest, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **flag.kwargs
        )
        added.append(flag)
    return added


def default_words(value: Any) -> str | None:
    """A default as help shows it: on/off for a switch, a list's values separated by spaces, None if unset."""
    if value is None or value == ():
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def flag_names(flags: Sequence[Flag]) -> dict[tuple[type, str], str]:
    """``{(dataclass, field): "--flag"}`` for ``flags``: how a command names the fields an error names."""
    return {(flag.owner, flag.field): f"--{flag.name}" for flag in flags}


def given(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags given, grouped by the first part of their destination: ``{'train': {'lr': 1e-4}, ...}``."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." in key:
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = tuple(value) if isinstance(value, list) else value
    return groups


Config = TypeVar("Config")
"""A configuration dataclass (TrainConfig, CompareConfig, ...)."""


def nested_replace(config: Config, groups: dict[str, dict[str, Any]], group: str) -> Config:
    """``config`` with the given fields of ``group`` replaced, and its nested dataclasses from their groups."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"nested_replace needs a dataclass instance, got {type(config).__name__}")
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
            shown = {k for k, a in actions.items() if a.help != argparse.SUPPRESS and k not in ("config", "help")}
            valid = ", ".join(sorted(k for k in shown if not k.startswith("no-")))
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
