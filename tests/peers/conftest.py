"""Peer-parity tests: record the largest difference measured per preset and print it at the end.

``pytest tests/peers -q`` ends with a table "preset | peer | quantity | largest |difference|", the
numbers quoted in the README's parity table.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

_LARGEST: dict[tuple[str, str, str], float] = defaultdict(float)


def _record(preset: str, peer: str, quantity: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Store max |ours - theirs| under (preset, peer, quantity) and return it."""
    diff = (ours.detach().double() - theirs.detach().double()).abs()
    value = float(diff.max()) if diff.numel() else 0.0
    key = (preset, peer, quantity)
    _LARGEST[key] = max(_LARGEST[key], value)
    return value


def _assert_close(
    preset: str, peer: str, quantity: str, ours: object, expected: object, rtol: float = 1e-13, atol: float = 1e-15
) -> None:
    """Assert ours == expected (a hand-derived value) in float64, recording the difference like ``record``."""
    ours_t = torch.as_tensor(ours, dtype=torch.float64)
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    _record(preset, peer, quantity, ours_t, expected_t)
    torch.testing.assert_close(ours_t, expected_t, rtol=rtol, atol=atol)


class _Recorder:
    """The ``record`` fixture: ``record(preset, peer, quantity, ours, theirs)`` stores the difference;
    ``record.assert_close(...)`` also asserts it against a hand-derived value."""

    __call__ = staticmethod(_record)
    assert_close = staticmethod(_assert_close)


@pytest.fixture
def record() -> _Recorder:
    return _Recorder()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _LARGEST:
        return
    terminalreporter.section("peer parity: largest |difference| measured")
    for (preset, peer, quantity), value in sorted(_LARGEST.items()):
        terminalreporter.write_line(f"{preset:<14} {peer:<22} {quantity:<22} {value:.2e}")
