"""``benchmarks/gpu.sh``, the GPU check, run here at small sizes on the CPU (``--cpu``), and its failure handling.

The check is meant for a GPU this machine does not have; running every section and script on the CPU says it
works before a GPU is lent. Its figures here only say that: the test checks the results file's sections and
the numbers that have an oracle (TRL's head and the fused loss against the logits path on the same inputs;
DrGRPOTrainer against the whole-batch gradient).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def gpu_sh(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the markdown table in the section whose heading starts with ``heading``."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]  # no header, no separator
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
def test_the_gpu_check_runs_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-cpu.md"
    proc = gpu_sh("--cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all 3 sections done" in proc.stdout
    text = out.read_text()
    assert "FAILED" not in text

    loss = {row[1]: row for row in table_rows(text, "Fused policy loss benchmark (cpu, bfloat16)")}
    assert set(loss) == {"logits", "trl-head", "drgrpo"}
    for method in ("trl-head", "drgrpo"):  # both against the logits path on the same bf16 inputs
        pattern = r"vs logits path: loss ([0-9.e+-]+), norm\(dh\) ([0-9.e+-]+), norm\(dW\) ([0-9.e+-]+)"
        match = re.search(pattern, loss[method][-1])
        assert match is not None, loss[method]
        assert max(float(x) for x in match.groups()) <= 1e-2, loss[method]
        assert float(loss[method][2]) > 0 and loss[method][6].endswith("MiB")

    step = {row[0]: row for row in table_rows(text, "One GRPO step inside TRL, CPU, bfloat16")}
    assert set(step) == {"drgrpo-fused", "trl"}
    assert all(float(row[1]) > 0 and row[3].endswith("MiB") for row in step.values())

    exact = table_rows(text, "DrGRPOTrainer against the whole-batch gradient")
    assert len(exact) == 2 and {row[3] for row in exact} == {"fused", "TRL head"}
    for row in exact:
        assert float(row[5]) <= 1e-5 and row[7].startswith("ok"), row


@pytest.mark.slow
def test_a_failing_section_does_not_hide_the_others(tmp_path: Path) -> None:
    """A stand-in Python: section 2 fails, section 3 outlives its time limit, section 1 writes its table."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        '  *trl_step.py*) echo "boom: no step today" >&2; exit 3 ;;\n'
        "  *trl_exact.py*) sleep 30 ;;\n"
        "esac\n"
        'out=""; previous=""\n'
        'for arg in "$@"; do [ "$previous" = --out ] && out="$arg"; previous="$arg"; done\n'
        'printf "# Stand-in section\\n\\n| a | b |\\n" > "$out"\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "results" / "gpu-cpu.md"
    proc = gpu_sh("--cpu", "--out", str(out), env={"PYTHON": str(fake), "GPU_CHECK_TIMEOUT_S": "3"}, timeout=120)
    assert proc.returncode == 1
    assert "gpu.sh: 2 of 3 sections failed" in proc.stderr
    text = out.read_text()
    assert "## Stand-in section" in text  # section 1's results are there
    assert "## One GRPO step inside TRL: FAILED (exit status 3)" in text
    assert "boom: no step today" in text  # with the failed command's last lines
    assert "## DrGRPOTrainer against the whole-batch gradient: FAILED (did not finish within 3 s)" in text
    assert (tmp_path / "results" / "gpu-cpu-2.log").read_text().strip() == "boom: no step today"


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--gpu"], "unknown argument '--gpu'"), (["--out"], "--out needs a file name")],
)
def test_bad_arguments_get_one_clear_line(args: list[str], message: str) -> None:
    proc = gpu_sh(*args, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gpu.sh: {message}" + (
        " (expected --cpu, --out FILE or --help)" if "unknown" in message else ""
    )
