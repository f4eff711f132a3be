"""A bad configuration value, reported in the caller's names: Python field names in code, flags on the command line.

The configuration dataclasses check their fields in ``__post_init__``. One check serves two readers: a
Python caller who wrote ``TrainConfig(eval_size=-1)`` and a command-line user who wrote ``--eval-size -1``.
A :class:`FieldError` is written with the Python names and lists the fields its message names, so the
command line can print the same message with its flags (:meth:`FieldError.renamed`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any


class FieldError(ValueError):
    """A configuration field holds a value it must not (a ValueError).

    ``owner`` is the dataclass, ``fields`` the fields the message names (the one at fault first), and
    ``str(error)`` the message with their Python names, e.g. ``eval_size must be >= 0, got -1``.
    """

    def __init__(self, owner: type, fields: str | tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.owner = owner
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross process boundaries (drgrpo compare's runs)
        return type(self), (self.owner, self.fields, self.message)

    def renamed(self, names: Mapping[tuple[type, str], str]) -> str:
        """The message with each field it names written as ``names[(owner, field)]`` (a flag, ``--eval-size``).

        A field missing from ``names`` keeps its Python name. Only whole names are replaced: ``steps`` in
        ``--warm-start-steps`` or in ``max_steps`` is left alone.
        """
        known = {field: names[(self.owner, field)] for field in self.fields if (self.owner, field) in names}
        if not known:
            return self.message
        pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, known)) + r")(?![\w-])")
        return pattern.sub(lambda m: known[m.group(1)], self.message)


def check_finite_fields(config: object) -> None:
    """Refuse NaN and infinity in every float field of the dataclass ``config`` (and in tuples of floats).

    For a configuration's ``__post_init__``: ``TrainConfig(lr=math.nan)`` raises ``lr must be a finite number,
    got nan``, and ``drgrpo train --lr nan`` prints it as ``--lr must be a finite number, got nan``.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"check_finite_fields needs a dataclass instance, got {type(config).__name__}")
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise FieldError(type(config), f.name, f"{f.name} must be a finite number, got {v}")
