"""docs/trl.md and README's TRL section run as written (the long example with 2 steps instead of 20) and train."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import trl_harness  # noqa: F401  (offline, quiet)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "trl.md"
README = ROOT / "README.md"


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


def trl_section(path: Path) -> str:
    text = path.read_text()
    start = text.index("## Use with TRL")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.slow
def test_the_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (code,) = [b for b in blocks(DOC, "python") if "DrGRPOTrainer" in b]
    assert "max_steps=20" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("max_steps=20", "max_steps=2"), "docs/trl.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert trainer.loss_config.max_completion_length == 8 and trainer.fused
    assert trainer.args.loss_type == "dr_grpo" and trainer.args.scale_rewards == "none"
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama").state_dict()
    trained = trainer.model.state_dict()
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)  # two optimizer steps moved the weights


def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", trl_section(README), re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2 and trainer.args.loss_type == "dr_grpo"
    assert "scale_rewards 'group' -> 'none'" in caplog.text  # the warning the comment announces


@pytest.mark.slow
def test_the_command_line_example_runs(tmp_path: Path) -> None:
    (script,) = [b for b in blocks(DOC, "bash") if "drgrpo.integrations.trl" in b]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # python is this environment's
    out = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Training completed; model saved to runs/trl-cli" in out.stdout
    assert "loss_type 'dapo' -> 'dr_grpo'; scale_rewards 'group' -> 'none'" in out.stderr
    assert (tmp_path / "runs" / "trl-cli" / "model.safetensors").exists()
