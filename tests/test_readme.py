"""The README's loss-library example runs as written, and its numbers agree with the float64 reference."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from drgrpo import reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs_and_matches_the_reference(capsys):
    block = re.search(r"```python\n(import torch\nfrom drgrpo import LossConfig.*?)```", README.read_text(), re.S)
    assert block is not None, "the usage example is missing from README.md"
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    out, logp, mask, adv, config = (namespace[k] for k in ("out", "logp", "mask", "adv", "config"))
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    lp = logp.detach().double().numpy()
    expected = reference.policy_loss(lp, lp - 0.1, adv.double().numpy(), mask.double().numpy(), config)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(adv.numpy(), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])
    assert "tensor(" in capsys.readouterr().out
