"""A named registry: a dict filled by a decorator, a getter whose error lists the valid names.

verl's ``register_policy_loss`` is the model, with one difference: a second function under a taken
name is an error, not a silent overwrite. :mod:`drgrpo.surrogates` keeps the surrogates in one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Members of one kind (e.g. ``"surrogate"``) by name, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._members: dict[str, T] = {}

    def add(self, name: str, member: T) -> None:
        """Register ``member`` under ``name``; a ValueError if the name is taken."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty str, got {name!r}")
        if name in self._members:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered ({self._members[name]!r}); pick another name"
            )
        self._members[name] = member

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return its member (for tests that register a temporary one)."""
        return self._members.pop(name)

    def get(self, name: str) -> T:
        """The member registered under ``name``; a ValueError listing the valid names otherwise."""
        try:
            return self._members[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._members.values()))

    def __len__(self) -> int:
        return len(self._members)


@dataclass(frozen=True)
class SurrogateMember:
    """One member of the family: a per-token surrogate, its float64 oracle and what it reads.

    ``loss(x, config) -> Surrogate`` is the PyTorch function (:mod:`drgrpo.surrogates`: ``x`` holds the
    ``(B, T)`` ratio, advantage, log-probs and mask). ``oracle(token, config) -> float`` is its float64 value
    for one token from plain floats (:mod:`drgrpo.reference`), sharing no code with ``loss``;
    ``batch_oracle(rows, config)`` instead, for a member whose token loss depends on other tokens (one list
    of per-token values per completion).
    """

    name: str
    loss: Callable[..., Any]
    """The PyTorch surrogate, ``(SurrogateInputs, LossConfig) -> Surrogate`` over ``(B, T)`` tensors."""
    oracle: Callable[..., float] | None
    """float64 per-token oracle ``(OracleToken, LossConfig) -> float``, or None with ``batch_oracle``."""
    batch_oracle: Callable[..., list[list[float]]] | None
    """float64 oracle over whole completions ``(list[OracleRow], LossConfig) -> per-token losses``, or None."""
    fields: tuple[str, ...]
    """The LossConfig fields the member reads (beyond ``ratio_level``, which every member's ratio follows)."""
    formula: str
    """The per-token loss, as docs/losses.md shows it."""
    paper: str
    """Where it comes from (authors, year, arXiv id)."""
    frameworks: str
    """The peer frameworks' names for it (``TRL loss_type``, ``verl loss_mode``)."""
    peer_fields: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Per peer (``"trl"``, ``"verl"``): the peer's setting -> the LossConfig field it sets for this member."""
    folds_sampling_weight: bool = False
    """True when the member reads the sampler correction's weight itself (VESPO) instead of being multiplied by it."""
    whole_rows: bool = False
    """True when a token's loss depends on other tokens of its completion (the fused path keeps rows whole)."""
    check: Callable[[Any], None] | None = None
    """``check(config)`` raises a ValueError naming the fields when the config's values are not valid for this
    member (LossConfig calls it after its own checks); None: no rules of its own."""


SURROGATES: Registry[SurrogateMember] = Registry("surrogate")
"""Every surrogate; :mod:`drgrpo.surrogates` fills it (``import drgrpo`` imports that module first)."""
