"""The README's "Use with TRL" example runs as written (with 2 steps instead of 20) and trains."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import trl_harness  # noqa: F401  (offline, quiet)

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.slow
def test_readme_trl_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = re.search(
        r"```python\n(from datasets import Dataset\nfrom trl import GRPOConfig.*?)```", README.read_text(), re.S
    )
    assert block is not None, "the TRL example is missing from README.md"
    code = block.group(1)
    assert "max_steps=20" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("max_steps=20", "max_steps=2"), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert trainer.loss_config.max_completion_length == 8 and trainer.fused
    assert os.path.isdir(tmp_path / "tiny-llama")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama").state_dict()
    trained = trainer.model.state_dict()
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)  # two optimizer steps moved the weights
