"""The docs are tested: every code block of README.md and docs/*.md runs as written, read from the Markdown.

The convention (docs/testing.md, "Docs are tested", says the same for writers):

- Every fenced block names its language. ``bash`` and ``sh`` blocks run with ``bash -euo pipefail``, ``python``
  blocks in this process (as ``__main__``, in the block's directory; the global state they change is put back,
  :func:`run_python`); ``text`` blocks (output, formulas, layouts) are shown, not run. Any other language, or
  none, fails :func:`test_every_block_is_runnable_or_text`.
- A block runs in a fresh directory that stands for the repository root: copies of ``README.md``, ``LICENSE``,
  ``benchmarks/``, ``docs/`` and ``examples/``, links to the code and the environments (``src/``, ``scripts/``,
  ``tests/``, ``.venv``, ...) and an empty ``runs/``, so the docs' relative paths work and what a block writes
  lands in the directory, which is thrown away. A block may not write over a shipped file (a report, a result, the
  data): :func:`run_block` checks the copies. ``.venv/bin`` comes first on PATH; Hugging Face libraries are offline.
- Its ``drgrpo`` commands, and its ``python`` commands in ``.venv`` (``python FILE.py``, ``-m MODULE``, ``-c CODE``,
  ``-``, and the children the scripts start with ``sys.executable``), run in a child forked from a server that
  imported drgrpo, torch, transformers and TRL once (``helpers.forked_drgrpo``: the command's own process,
  arguments, ``sys.path``, directory, environment, streams and exit status, without importing torch again).
  :func:`test_the_stand_in_drgrpo_is_the_console_script` and :func:`test_the_stand_in_python_is_the_interpreter`
  compare them with the installed console script and the interpreter. Any other ``python`` invocation, or an
  environment that differs in a variable read at import time (a benchmark's ``OMP_NUM_THREADS`` for its
  children), runs the real program. ``DRGRPO_DOCS_FORK=0`` runs the real ones throughout.
- Directives, in HTML comments on the lines right above a block (the rendered page does not show them, so the
  page says in words, next to the block, when a block is shortened):

  ``<!-- doc-test: short -->``
      append the flags of :data:`SHORT` to every ``drgrpo train`` and ``drgrpo compare`` command of the block
      (a few steps, a short warm start, small evaluations);
  ``<!-- doc-test: replace `OLD` with `NEW` -->``
      run the block with OLD replaced by NEW (OLD must occur in it);
  ``<!-- doc-test: needs runs/default -->``
      start from a directory that already holds a prepared run at that path (:data:`FIXTURES`: made once per
      session, copied for each block; the fixture checks what a block would: exit 0, no shipped file changed);
  ``<!-- doc-test: in .venv-verl -->``
      run with ``.venv-verl/bin`` first on PATH (verl's own environment);
  ``<!-- doc-test: verl-launch -->``
      a ``python -m verl.trainer.main_ppo`` command line, which needs a cluster: its Hydra overrides are composed
      with verl's configuration in ``.venv-verl`` and the loss mode they select is run on a small batch and
      compared with drgrpo's reference (``tests/verl_live/launch_check.py``).

- Lines that are checked instead of run: ``bash scripts/setup.sh EXTRAS`` and ``pip install '.[EXTRAS]'`` (the
  suite runs inside the environment they make: every extra must exist in pyproject.toml; what follows ``&&`` on
  the line runs), the CI command (it must be exactly the last line of ``.ci/run``), a ``pytest`` line (its
  paths must exist inside this suite, which runs them), and a block's first command when it is a fixture's (the
  same words once the directives apply, ``.venv/bin/drgrpo`` being ``drgrpo``): the block starts from that
  fixture, as if it had run the command (the quick start's ``drgrpo train --output-dir runs/default`` runs once
  per session, not once per page). Blocks that then run the same code are one test (:func:`runnable`).
- :data:`CHECKS` holds an oracle check for a block whose output is a number to verify (it gets the block's
  variables: a python block's, or a bash block's ``stdout``, ``stderr`` and directory); :data:`NOT_RUN` lists,
  with the reason, the blocks that cannot run at all. Both are keyed by :attr:`Block.name` ("page: first
  line"); a key that matches no block fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import forked_drgrpo
from helpers.shared_dirs import default_warm_start, shared_dir

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash": "bash", "sh": "bash", "python": "python"}
SHOWN = {"text"}
COPIED = ("README.md", "LICENSE", "benchmarks", "docs", "examples")
"""What a block's directory holds copies of: what blocks read and could write over (reports, results, data)."""
LINKED = ("pyproject.toml", ".ci", "scripts", "src", "tests", ".venv", ".venv-verl")
"""What it links to (when it exists in the repository): the code and the environments."""
TIMEOUT_S = 1800

SHORT = {
    "train": "--steps 2 --eval-every 1 --eval-size 8 --prompts-per-step 8 --warm-start-steps 10 "
    "--warm-start-target-accuracy 0",
    "compare": "--steps 2 --seeds 1 --eval-every 1 --eval-size 8 --prompts-per-step 8 --warm-start-steps 10 "
    "--warm-start-target-accuracy 0 --jobs 1",
}
"""What ``<!-- doc-test: short -->`` appends to ``drgrpo train`` and ``drgrpo compare`` commands. ``--jobs 1``: the
short runs take less time than a process takes to start, so one process trains them one after the other
(tests/train/test_compare.py runs them side by side)."""

FIXTURES: dict[str, str | Callable[[Path, pytest.TempPathFactory], object]] = {
    "runs/default": f"drgrpo train --output-dir runs/default {SHORT['train']}",  # the quick start's run
    # the TRL examples' model: the default warm start, made once for the session (test_trl_trainer reads it too)
    "tiny-llama": lambda where, factory: shutil.copytree(default_warm_start(factory), where / "tiny-llama"),
}
"""What ``<!-- doc-test: needs PATH -->`` prepares, once per session: the command that makes PATH, or a function
of the fixture's directory (and pytest's ``tmp_path_factory``) run in this process. A block whose first command
is one of these commands (the same words) starts from the fixture instead of running it again
(:func:`fixture_lines`)."""

NOT_RUN: dict[str, str] = {}
"""Blocks that cannot run at all, by :attr:`Block.name`, with the reason."""


# --------------------------------------------------------------------------- reading the Markdown


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    """The page, relative to the repository root."""
    line: int
    """The line of the opening fence (1-based)."""
    lang: str
    """The fence's language ("" when it names none)."""
    code: str
    """The block's text."""
    directives: tuple[str, ...]
    """The doc-test directives above it."""

    @property
    def name(self) -> str:
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")
        return f"{self.page}: {first}"


DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\S*)\s*$")


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the doc-test directives on the lines right above each."""
    lines = path.read_text().splitlines()
    page = str(path.relative_to(ROOT))
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        directives, j = [], i - 1
        while j >= 0 and DIRECTIVE.match(lines[j]):
            directives.insert(0, DIRECTIVE.match(lines[j]).group(1))  # type: ignore[union-attr]
            j -= 1
        end = next((k for k in range(i + 1, len(lines)) if lines[k].strip() == "```"), None)
        assert end is not None, f"{page}:{i + 1}: a code block that is never closed"
        blocks.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", tuple(directives)))
        i = end + 1
    return blocks


ALL = [block for page in PAGES for block in read_blocks(page)]


def runnable() -> list[Block]:
    """The blocks to run: each distinct one once (a page may repeat another's block: the README's verl line).

    Two blocks are the same when what runs is the same (:func:`prepare`): the quick start of the README and of
    training.md both plot the prepared default run."""
    seen, out = set(), []
    for b in ALL:
        if b.lang in RUN and b.name not in NOT_RUN:
            try:
                code, settings = prepare(b)
                key = (b.lang, code, tuple(settings["needs"]), settings["venv"], settings["verl_launch"])
            except AssertionError:  # a bad line or directive: its test fails, saying why
                key = (b.lang, b.code, b.directives, "", False)
            if key not in seen:
                seen.add(key)
                out.append(b)
    return out


# --------------------------------------------------------------------------- preparing a block


def ci_command() -> str:
    """The command CI runs: the last line of .ci/run."""
    return [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()][-1].strip()


def extras() -> set[str]:
    """The package's extras, and ``verl`` (setup.sh makes .venv-verl for it)."""
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]) | {"verl"}


def check_extras(names: str, where: str) -> None:
    unknown = [n for n in names.split(",") if n not in extras()]
    assert not unknown, f"{where}: {unknown} are not extras of pyproject.toml (known: {sorted(extras())})"


PYTEST = (["pytest"], ["python", "-m", "pytest"], [".venv/bin/pytest"], [".venv/bin/python", "-m", "pytest"])
PYTEST_VALUE_OPTIONS = {"-k", "-m", "-p", "-n", "--dist", "--maxfail", "--durations"}


def pytest_targets(text: str) -> list[str] | None:
    """The test paths of a pytest command line, its options anywhere (None: the line is not a pytest command)."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return None
    prefix = next((p for p in PYTEST if words[: len(p)] == p), None)
    if prefix is None:
        return None
    targets, rest = [], iter(words[len(prefix) :])
    for word in rest:
        if word in PYTEST_VALUE_OPTIONS:
            next(rest, None)
        elif not word.startswith("-"):
            targets.append(word)
    return targets


def checked_lines(code: str, where: str) -> str:
    """The bash code with the checked-not-run lines checked and taken out (see the module docstring)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        text = line.strip()
        if text == ci_command():
            continue  # CI runs it (test_ci_runs_the_readme_test_command)
        setup = re.match(r"^bash scripts/setup\.sh (\S+)(?:\s*&&\s*(.*))?$", text)
        pip = re.match(r"^(?:python -m )?pip install (?:-e )?'\.\[([\w,]+)\]'(?:\s*#.*)?$", text)
        targets = pytest_targets(text)
        if setup:
            check_extras(setup.group(1), where)
            line = setup.group(2) or ""
        elif pip:
            check_extras(pip.group(1), where)
            line = ""
        elif targets is not None:
            for target in targets:
                path = ROOT / target.split("::")[0]
                assert path.exists() and path.is_relative_to(ROOT / "tests"), f"{where}: pytest {target}: no such test"
            line = ""
        out.append(line)  # any other line as written: its indentation matters inside a here-document
    return "\n".join(out) + "\n"


def apply_directives(block: Block) -> tuple[str, dict[str, Any]]:
    """The code to run and the settings the directives ask for."""
    code, settings = block.code, {"needs": [], "venv": ".venv", "verl_launch": False}
    for directive in block.directives:
        replace = re.fullmatch(r"replace `(.+?)` with `(.*)`", directive)
        if directive == "short":
            pattern = re.compile(r"(\bdrgrpo (train|compare)\b[^\n#]*?)(\s*(#[^\n]*)?)$", re.M)
            code, count = pattern.subn(lambda m: f"{m.group(1)} {SHORT[m.group(2)]}{m.group(3)}", _joined(code))
            assert count, f"{block.name}: 'short' on a block with no drgrpo train or drgrpo compare command"
        elif replace:
            assert replace.group(1) in code, f"{block.name}: cannot replace {replace.group(1)!r}: not in the block"
            code = code.replace(replace.group(1), replace.group(2))
        elif directive.startswith("needs "):
            path = directive.removeprefix("needs ")
            assert path in FIXTURES, f"{block.name}: no fixture makes {path!r} (known: {sorted(FIXTURES)})"
            settings["needs"].append(path)
        elif directive == "in .venv-verl":
            settings["venv"] = ".venv-verl"
        elif directive == "verl-launch":
            settings["verl_launch"] = True
        else:
            raise AssertionError(f"{block.name}: unknown doc-test directive {directive!r}")
    return code, settings


def _joined(code: str) -> str:
    return code.replace("\\\n", " ")


def command_words(line: str) -> list[str] | None:
    """A shell line's words, comments dropped, ``.venv/bin/NAME`` as ``NAME`` (.venv/bin is first on PATH)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    if words and words[0].startswith(".venv/bin/"):
        words[0] = words[0].removeprefix(".venv/bin/")
    return words


ACTIVATE = [".", ".venv/bin/activate"]
"""Activating the environment: the blocks run with it active already (:func:`environment`)."""


def fixture_lines(shell: str) -> tuple[str, list[str]]:
    """The code without its first command when that command is a fixture's, and the fixtures to start from.

    The fixture ran that command, with the same environment, in a directory like the block's, and checked what
    the block would (exit 0, no shipped file changed): the block starts from its result instead of running it
    again. Only the block's first command counts (after activating the environment, a no-op here)."""
    lines = shell.splitlines()
    for i, line in enumerate(lines):
        words = command_words(line)
        if not words or words == ACTIVATE:
            continue
        made = [path for path, by in FIXTURES.items() if isinstance(by, str) and words == shlex.split(by)]
        if made:
            rest = [ln for ln in lines[:i] if command_words(ln) != ACTIVATE] + lines[i + 1 :]
            return "\n".join(rest) + "\n", made
        break
    return shell, []


def prepare(block: Block) -> tuple[str, dict[str, Any]]:
    """What runs for a block: the code after its directives, checked lines (bash) and fixtures, and its settings."""
    code, settings = apply_directives(block)
    if block.lang != "python" and not settings["verl_launch"]:
        code, made = fixture_lines(checked_lines(code, block.name))
        settings["needs"] += [path for path in made if path not in settings["needs"]]
    return code, settings


# --------------------------------------------------------------------------- running a block


SERVED: dict[str, Path] = {}
"""While the fork server runs (:func:`drgrpo_server`): ``bin``, the directory of the stand-ins ``drgrpo`` and
``python``, and ``log``, the server's log (a line per command it forked, and one per command it left to the real
program, saying why)."""


NOT_INHERITED = {"PYTHONPATH", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST"}
BASE_ENVIRONMENT = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
"""The environment the blocks start from, read when the tests are collected: what tests run in this process set
later (torch's imports set TORCHINDUCTOR_CACHE_DIR, pytest sets PYTEST_CURRENT_TEST) stays out of the blocks."""


def environment(venv: str = ".venv") -> dict[str, str]:
    env = dict(BASE_ENVIRONMENT)
    bins = [str(ROOT / venv / "bin"), str(Path(sys.executable).parent)]
    if venv == ".venv" and "bin" in SERVED:
        bins.insert(0, str(SERVED["bin"]))
    env.update(
        PATH=os.pathsep.join([*bins, env.get("PATH", "")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        MPLBACKEND="Agg",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def workdir(path: Path) -> Path:
    """A directory standing for the repository root (copies and links, see COPIED and LINKED) with an empty runs/."""
    path.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, path / name)
    for name in LINKED:
        if (ROOT / name).exists():
            (path / name).symlink_to(ROOT / name)
    (path / "runs").mkdir()
    return path


def snapshot(where: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of the copies in ``where`` (a block's directory)."""
    found = {}
    for name in COPIED:
        base = where / name
        files = (
            [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for p in files:
            st = p.stat()
            found[str(p.relative_to(where))] = (st.st_size, st.st_mtime_ns)
    return found


def run_shell(code: str, cwd: Path, venv: str = ".venv") -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=environment(venv), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    return proc


@contextlib.contextmanager
def kept_global_state() -> Iterator[None]:
    """Run code in this process and leave torch's, numpy's and Python's global state as it was."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    python_rng, numpy_rng, path = random.getstate(), np.random.get_state(), list(sys.path)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        sys.path[:] = path


def run_python(code: str, where: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run a python block in this process, in ``where`` with the blocks' environment; returns its variables.

    In this process rather than a new one (which would import torch and transformers again): the block runs as
    ``__main__`` with its directory as the working directory and first on ``sys.path``, as ``python FILE`` would;
    the global state it changes (threads, seeds, deterministic algorithms) is put back afterwards."""
    monkeypatch.chdir(where)
    for key, value in environment().items():
        monkeypatch.setenv(key, value)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    with kept_global_state():
        torch.set_num_threads(1)  # the tiny models run fastest on one thread, as the trainer runs them
        monkeypatch.syspath_prepend(str(where))  # put back by monkeypatch (and by kept_global_state)
        exec(compile(code, name, "exec"), namespace)
    return namespace


@pytest.fixture(scope="session")
def drgrpo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The blocks' ``drgrpo`` and ``python`` commands through a fork server that imported drgrpo, torch and TRL
    once (``helpers.forked_drgrpo``).

    ``DRGRPO_DOCS_FORK=0`` runs the real console script and interpreter instead; so do the stand-ins if the server
    is gone."""
    if os.environ.get("DRGRPO_DOCS_FORK") == "0":
        yield
        return
    base = tmp_path_factory.mktemp("drgrpo-server")
    address = Path("/tmp") / f"drgrpo-docs-{os.getpid()}.sock"  # a Unix socket's path has at most 107 bytes
    SERVED["bin"] = forked_drgrpo.write_stand_in(base / "bin", ROOT / ".venv" / "bin" / "drgrpo", address).parent
    forked_drgrpo.write_stand_in(base / "bin", ROOT / ".venv" / "bin" / "python", address, "python")
    SERVED["log"] = base / "server.log"
    server = subprocess.Popen(
        [sys.executable, forked_drgrpo.__file__, str(address)], cwd=base, env=environment(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=(base / "server.log").open("w"), text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready", (
            f"the fork server did not start: {(base / 'server.log').read_text()[-3000:]}"
        )
        yield
    finally:
        SERVED.clear()
        server.terminate()
        server.wait(timeout=60)
        address.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, drgrpo_server: None) -> Callable[[str], Path]:
    """``prepared(path)``: a directory holding the fixture ``path`` (made on first use, once per session for every
    pytest-xdist worker: ``helpers.shared_dirs``)."""
    made: dict[str, Path] = {}

    def make(path: str, where: Path) -> None:
        workdir(where)
        before, command = snapshot(where), FIXTURES[path]
        if isinstance(command, str):
            proc = run_shell(command, where)
            assert proc.returncode == 0, f"fixture {path}: {command}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        else:
            command(where, tmp_path_factory)
        changed = sorted(k for k, v in snapshot(where).items() if before.get(k) != v)
        assert not changed, f"fixture {path} changed the repository: {changed[:10]}"

    def get(path: str) -> Path:
        if path not in made:
            name = "docs-fixture-" + path.replace("/", "-")
            made[path] = shared_dir(tmp_path_factory, name, lambda where: make(path, where)) / path
        return made[path]

    return get


def run_block(block: Block, tmp_path: Path, prepared: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run one block as the module docstring says; returns its variables for a python block with a CHECK."""
    code, settings = prepare(block)
    where = workdir(tmp_path / "repo")
    for path in settings["needs"]:
        shutil.copytree(prepared(path), where / path, symlinks=True)
    before = snapshot(where)
    namespace: dict[str, Any] = {}
    try:
        if settings["verl_launch"]:
            namespace = verl_launch(code, where)
        elif block.lang == "python":
            namespace = run_python(code, where, block.page, monkeypatch)
        else:
            shell = code
            proc = run_shell(shell, where, settings["venv"])
            namespace = {"stdout": proc.stdout, "stderr": proc.stderr, "where": where}
            assert proc.returncode == 0, (
                f"{block.name} failed (exit {proc.returncode}); ran:\n{shell}\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-4000:]}"
            )
    finally:
        changed = sorted(k for k, v in snapshot(where).items() if before.get(k) != v)
        assert not changed, f"{block.name} changed the repository: {changed[:10]}"
    return namespace


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable(), ids=lambda b: f"{b.page}:{b.line}")
def test_block_runs(block: Block, tmp_path: Path, prepared: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    namespace = run_block(block, tmp_path, prepared, monkeypatch)
    if block.name in CHECKS:
        CHECKS[block.name](namespace)


@pytest.mark.slow
def test_the_stand_in_drgrpo_is_the_console_script(tmp_path: Path, drgrpo_server: None) -> None:
    # the blocks' drgrpo (the fork server's child) against the installed console script on the same commands:
    # the same exit code and message for a bad flag, and a short run ending on the same weights, bit for bit
    if "bin" not in SERVED:
        pytest.skip("DRGRPO_DOCS_FORK=0: the blocks run the console script itself")
    where = workdir(tmp_path / "repo")
    real = str(ROOT / ".venv" / "bin" / "drgrpo")
    assert shutil.which("drgrpo", path=environment()["PATH"]) == str(SERVED["bin"] / "drgrpo")
    run = SHORT["train"].replace("--steps 2", "--steps 1")
    forked_before = SERVED["log"].read_text().count("forked ")
    for args in ("train --lr nan --output-dir runs/x", f"train {run} --output-dir runs/{{}}"):
        forked = run_shell(f"drgrpo {args.format('forked')}", where)
        installed = run_shell(f"{real} {args.format('installed')}", where)
        assert forked.returncode == installed.returncode, args
        if "{}" not in args:
            assert (forked.stdout, forked.stderr) == (installed.stdout, installed.stderr), args
    message = "drgrpo train: error: --lr must be a finite number, got nan\n"  # exit 2, one line
    assert run_shell("drgrpo train --lr nan || echo $?", where).stderr == message
    assert SERVED["log"].read_text().count("forked ") == forked_before + 3, SERVED["log"].read_text()[-2000:]
    from safetensors.torch import load_file

    weights = [load_file(next((where / "runs" / r / "checkpoints").glob("step_*")) / "model.safetensors")
               for r in ("forked", "installed")]  # fmt: skip
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


PROBE = """\
import json, multiprocessing.spawn, os, subprocess, sys

child = [sys.executable, "-c", "import sys; print(sys.argv, repr(sys.path[0]), __name__)", "z"]
facts = {
    "name": __name__, "file": globals().get("__file__"), "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
    "pythonpath": [p for p in sys.path if p.endswith("examples")], "executable": sys.executable,
    "spawn": os.fsdecode(multiprocessing.spawn.get_executable()),  # bytes in Python 3.11
    "child": subprocess.run(child, capture_output=True, text=True).stdout,
}
if sys.argv[-1] == "torch":
    import torch

    torch.manual_seed(0)
    facts["x"] = torch.rand(3).tolist()
with open(sys.argv[1], "w") as f:
    json.dump(facts, f)
if sys.argv[-1] == "fail":
    print("before the error")
    raise ValueError("a bad value")
"""
"""A block-like script: what it sees of its process, written to its first argument."""


@pytest.mark.slow
def test_the_stand_in_python_is_the_interpreter(tmp_path: Path, drgrpo_server: None) -> None:
    # the blocks' python (the fork server's child) against the interpreter on each form the server runs: the same
    # exit code, what the script sees (argv, sys.path, __name__, __file__, its own [sys.executable, ...] child),
    # the same output (torch's numbers included), the same streams for an uncaught exception
    if "bin" not in SERVED:
        pytest.skip("DRGRPO_DOCS_FORK=0: the blocks run the interpreter itself")
    where = workdir(tmp_path / "repo")
    (where / "probe.py").write_text(PROBE)
    real, stand_in = str(ROOT / ".venv" / "bin" / "python"), str(SERVED["bin"] / "python")
    assert shutil.which("python", path=environment()["PATH"]) == stand_in
    forms = {
        "file": "{} probe.py runs/out.json torch",
        "module": "{} -m probe runs/out.json",
        "code": '{} -c "$(cat probe.py)" runs/out.json',
        "stdin": "{} - runs/out.json < probe.py",
        "fail": "{} probe.py runs/out.json fail",
    }
    forked_before = SERVED["log"].read_text().count("forked ")
    for form, command in forms.items():
        seen = []
        for python in ("python", real):
            proc = run_shell(f"export PYTHONPATH=examples\n{command.format(python)}", where)
            seen.append((proc.returncode, proc.stdout, proc.stderr, json.loads((where / "runs/out.json").read_text())))
        (forked, installed) = seen
        assert forked[0] == installed[0] == (1 if form == "fail" else 0), (form, forked[2][-2000:])
        assert forked[3].pop("executable") == stand_in and installed[3].pop("executable") == real
        assert forked[3] == installed[3], form
        assert forked[3]["spawn"] == real and forked[3]["name"] == "__main__"
        if form == "fail":
            assert (forked[1], forked[2]) == (installed[1], installed[2])
            assert forked[2].endswith("ValueError: a bad value\n")
    # each form, and the script's own child, forked; any other invocation is the interpreter's own
    assert SERVED["log"].read_text().count("forked ") == forked_before + 2 * len(forms), SERVED["log"].read_text()
    assert run_shell("python -I -c 'import sys; print(sys.executable)'", where).stdout == f"{real}\n"
    assert SERVED["log"].read_text().count("forked ") == forked_before + 2 * len(forms)


# --------------------------------------------------------------------------- the verl launch line


def verl_launch(code: str, where: Path) -> dict[str, Any]:
    """Compose the command line's overrides with verl's config and run the loss mode they select (in .venv-verl)."""

    words = shlex.split(_joined(code), comments=True)
    assert words[:3] == ["python", "-m", "verl.trainer.main_ppo"], f"not a verl launch line: {words[:3]}"
    overrides = [w for w in words[3:] if w != "..."]
    assert overrides and all("=" in w for w in overrides), f"expected KEY=VALUE overrides, got {overrides}"
    python = ROOT / ".venv-verl" / "bin" / "python"
    assert python.exists(), f"{python} is missing: bash scripts/setup.sh train,trl,peers,dev,verl makes it"
    out = where / "launch.json"
    env = {k: v for k, v in environment(".venv-verl").items() if not k.startswith("VERL_USE_EXTERNAL")}
    proc = subprocess.run(
        [str(python), str(ROOT / "tests" / "verl_live" / "launch_check.py"), str(out), *overrides],
        cwd=where, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, f"verl rejected the overrides {overrides}:\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    return {"overrides": dict(w.split("=", 1) for w in overrides), **result}


def check_verl_launch(ns: dict[str, Any]) -> None:
    """The loss verl runs for the launch line is drgrpo's preset with verl's settings (float64 reference)."""
    from drgrpo import LossConfig, reference

    settings = ns["overrides"]
    assert ns["loss_mode"] == settings["actor_rollout_ref.actor.policy_loss.loss_mode"]
    assert ns["loss_function"].startswith("drgrpo.integrations.verl.")
    preset = ns["loss_mode"].removeprefix("drgrpo.")
    config = LossConfig.preset(
        preset,
        max_completion_length=ns["loss_scale_factor"],
        clip_low=ns["clip_ratio_low"],
        clip_high=ns["clip_ratio_high"],
        dual_clip=ns["clip_ratio_c"],
    )
    inputs = {k: np.array(v) for k, v in ns["inputs"].items()}
    want = reference.oracle_policy_loss(inputs["logp"], inputs["old"], inputs["adv"], inputs["mask"], config)
    assert ns["loss"] == pytest.approx(want, rel=1e-10, abs=1e-15)
    assert str(ns["norm_adv_by_std_in_grpo"]) == settings.get("algorithm.norm_adv_by_std_in_grpo", "True")


# --------------------------------------------------------------------------- oracle checks of single blocks


def check_loss_example(ns: dict[str, Any]) -> None:
    """README's loss example: its loss against the float64 reference, its advantages by hand."""
    from drgrpo import reference

    out, logp, mask, adv, config = (ns[k] for k in ("out", "logp", "mask", "adv", "config"))
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    lp = logp.detach().double().numpy()
    expected = reference.oracle_policy_loss(lp, lp - 0.1, adv.double().numpy(), mask.double().numpy(), config)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # rewards (1, 0, 0, 1) and (1, 1, 0, 1): group means 0.5 and 0.75, no std division
    np.testing.assert_allclose(adv.numpy(), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])


def check_trl_example(ns: dict[str, Any]) -> None:
    """The TRL example trained (one step under the suite) from the saved warm start, and moved the weights."""
    from transformers import AutoModelForCausalLM

    trainer = ns["trainer"]
    assert trainer.state.global_step == 1
    assert trainer.loss_config.max_completion_length == 8 and trainer.fused
    assert trainer.args.loss_type == "dr_grpo" and trainer.args.scale_rewards == "none"  # set from loss_config
    saved = AutoModelForCausalLM.from_pretrained(ns["model_dir"]).state_dict()
    trained = trainer.model.state_dict()
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)


def check_trl_page_example(ns: dict[str, Any]) -> None:
    """trl.md's Python example: two steps from the warm start, TRL's names describing the loss that ran."""
    from transformers import AutoModelForCausalLM

    trainer = ns["trainer"]
    assert trainer.state.global_step == 2
    assert trainer.loss_config.max_completion_length == 8 and trainer.fused
    assert trainer.args.loss_type == "dr_grpo" and trainer.args.scale_rewards == "none"
    saved = AutoModelForCausalLM.from_pretrained(ns["model_dir"]).state_dict()
    trained = trainer.model.state_dict()
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)


def check_trl_command_line(ns: dict[str, Any]) -> None:
    """trl.md's command line: two steps from the YAML file, the settings warning printed, the model saved."""
    assert "Training completed; model saved to runs/trl-cli" in ns["stdout"]
    assert "loss_type 'dapo' -> 'dr_grpo'; scale_rewards 'group' -> 'none'" in ns["stderr"]
    assert (ns["where"] / "runs" / "trl-cli" / "model.safetensors").exists()


def check_config_errors(ns: dict[str, Any]) -> None:
    """faults.md: TrainConfig refuses each bad value, naming the field (the messages the page prints)."""
    assert ns["messages"] == [
        "lr must be a finite number, got nan",
        "grad_clip must be >= 0 (0 turns clipping off), got -1.0",
        "reward_weights must be a finite number, got inf",
    ]


def check_resume_and_branch(ns: dict[str, Any]) -> None:
    """faults.md: the older checkpoint is refused in its run (exit 2, naming both steps); the branch records --lr."""
    assert "refused: exit code 2" in ns["stdout"]
    assert "is step 2 of the run in runs/faults, whose newest checkpoint is step 6" in ns["stderr"]
    assert "branched at step 2 from" in ns["stdout"] and "--lr 0.0005 -> 0.0001" in ns["stdout"]


def check_rerun_from_config(ns: dict[str, Any]) -> None:
    """training.md: the run again from its config.yaml ends on the same weights, bit for bit."""
    from safetensors.torch import load_file

    def last_weights(run: str) -> dict[str, torch.Tensor]:
        newest = max((ns["where"] / run / "checkpoints").glob("step_*"))
        return load_file(newest / "model.safetensors")

    first, again = last_weights("runs/default"), last_weights("runs/again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def check_split_step(ns: dict[str, Any]) -> None:
    """distributed.md: the micro-batch losses add up to the whole batch's float64 reference loss."""
    from drgrpo import reference

    mask = ns["mask"].double().numpy()
    logp = ns["logp"].detach().double().numpy()  # the same weights: the step came after the check
    want = reference.oracle_policy_loss(logp, logp, ns["adv"].double().numpy(), mask, ns["config"])
    assert ns["step_loss"] == pytest.approx(want, rel=1e-5)
    assert (ns["whole_grad"] - ns["accumulated"]).abs().max() <= 1e-6 * ns["whole_grad"].abs().max()


def check_spec_example(ns: dict[str, Any]) -> None:
    """losses.md: the specified function and the paper's variant against the values derived by hand."""
    e = math.exp(0.1) + math.exp(-0.1) - 2
    assert ns["spec"] == pytest.approx(-(e / (3 * math.sqrt(2)) - 0.04 * 0.1 / 3), rel=1e-12)
    assert ns["paper"] == pytest.approx(-e / 9, rel=1e-12)


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "README.md: import torch": check_loss_example,
    "README.md: from datasets import Dataset": check_trl_example,
    "docs/trl.md: from datasets import Dataset": check_trl_page_example,
    "docs/trl.md: python - <<'EOF'": check_trl_command_line,
    "docs/faults.md: import math": check_config_errors,
    "docs/faults.md: drgrpo train --output-dir runs/faults --steps 4 --checkpoint-every 2 --eval-every 0 "
    "--prompts-per-step 8 \\": check_resume_and_branch,
    "docs/training.md: drgrpo eval --model runs/default" + " " * 46 + "# its latest checkpoint": (
        check_rerun_from_config
    ),
    "docs/distributed.md: import torch": check_split_step,
    "docs/losses.md: import numpy as np": check_spec_example,
    "README.md: python -m verl.trainer.main_ppo ... \\": check_verl_launch,
    "docs/verl.md: python -m verl.trainer.main_ppo ... \\": check_verl_launch,
}
"""Oracle checks of single blocks, by :attr:`Block.name`."""


# --------------------------------------------------------------------------- the convention itself


def test_every_block_is_runnable_or_text() -> None:
    bad = [f"{b.page}:{b.line} ```{b.lang}" for b in ALL if b.lang not in RUN and b.lang not in SHOWN]
    assert not bad, f"code blocks must be bash, sh, python (run) or text (shown): {bad}"


def test_directives_and_lists_name_real_blocks() -> None:
    names = [b.name for b in ALL]
    for block in ALL:
        if block.lang in RUN:
            apply_directives(block)  # unknown directives, replacements that match nothing
    for listed in (*CHECKS, *NOT_RUN):
        assert listed in names, f"{listed!r} names no block of README.md or docs/*.md"
    checked = [n for n in names if n in CHECKS]
    assert len(checked) == len(set(checked)), "two blocks share a name that CHECKS uses: make their first lines differ"


def test_ci_runs_the_readme_test_command() -> None:
    # the README's set-up block: its second line is the test command, which CI (.ci/run) runs as it is
    readme = next(b for b in ALL if b.page == "README.md" and b.lang == "bash")
    lines = [ln.strip() for ln in readme.code.splitlines() if ln.strip()]
    assert lines[1] == ci_command(), f"README's test command {lines[1]!r} is not .ci/run's {ci_command()!r}"
    assert lines[0].startswith("bash scripts/setup.sh train && .venv/bin/drgrpo train --output-dir runs/default")


def test_setup_lines_are_checked_not_run() -> None:
    # the rules of checked_lines on lines written here (an independent statement of the convention)
    assert checked_lines("bash scripts/setup.sh train && . .venv/bin/activate\n", "t").strip() == ". .venv/bin/activate"
    assert checked_lines("pip install '.[trl]'\n", "t").strip() == ""
    assert checked_lines(".venv/bin/python -m pytest tests/peers -q\n", "t").strip() == ""
    assert checked_lines(".venv/bin/python -m pytest -q tests/peers -k verl  # note\n", "t").strip() == ""
    line = "python -m pytest -q tests/a.py -k 'x and y' tests/b.py::t"
    assert pytest_targets(line) == ["tests/a.py", "tests/b.py::t"]
    assert pytest_targets("python -m drgrpo train") is None
    with pytest.raises(AssertionError, match="not extras"):
        checked_lines("pip install '.[nope]'\n", "t")
    with pytest.raises(AssertionError, match="no such test"):
        checked_lines("pytest tests/nowhere.py\n", "t")
    assert checked_lines("drgrpo train --output-dir runs/x\n", "t") == "drgrpo train --output-dir runs/x\n"
    heredoc = "python - <<'EOF'\nfor i in range(2):\n    print(i)\nEOF\n"
    assert checked_lines(heredoc, "t") == heredoc  # indentation kept


def test_short_appends_before_a_comment() -> None:
    block = Block("p", 1, "bash", "drgrpo train --output-dir runs/a   # note\ndrgrpo plot runs/a\n", ("short",))
    code, _ = apply_directives(block)
    assert code == f"drgrpo train --output-dir runs/a {SHORT['train']}   # note\ndrgrpo plot runs/a\n"


def test_a_fixture_command_starts_the_block_from_the_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    # the rule of fixture_lines on lines written here: the block's first command, the same words as the fixture's
    command = "drgrpo train --output-dir runs/default --steps 2"
    with monkeypatch.context() as patched:
        patched.setitem(FIXTURES, "runs/default", command)
        code = f". .venv/bin/activate\n.venv/bin/{command}   # note\ndrgrpo plot runs/default\n"
        assert fixture_lines(code) == ("drgrpo plot runs/default\n", ["runs/default"])
        for runs in (
            f"drgrpo eval --model runs/x\n{command}\n",  # not the first command
            f"{command} --lr 1e-3\n",  # other words
            command.replace("runs/default", "runs/other") + "\n",
        ):
            assert fixture_lines(runs) == (runs, [])
    # the quick start, shortened as the README's block is: its run is the fixture's, only the plot runs
    block = Block("p", 1, "bash", "drgrpo train --output-dir runs/default\ndrgrpo plot runs/default\n", ("short",))
    code, settings = prepare(block)
    assert (code, settings["needs"]) == ("drgrpo plot runs/default\n", ["runs/default"])


def test_python_blocks_run_here_and_leave_the_global_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), random.getstate())
    rng = torch.random.get_rng_state()
    code = (
        "import os, random, sys, torch\n"
        "torch.manual_seed(5); random.seed(5); torch.use_deterministic_algorithms(True); torch.set_num_threads(1)\n"
        "x, where, first = torch.rand(1).item(), os.getcwd(), sys.path[0]\n"
    )
    namespace = run_python(code, tmp_path, "t", monkeypatch)
    assert namespace["x"] == torch.rand(1, generator=torch.Generator().manual_seed(5)).item()
    assert namespace["where"] == namespace["first"] == str(tmp_path) and namespace["__name__"] == "__main__"
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the blocks' environment, until monkeypatch puts it back
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), random.getstate()) == state
    assert torch.equal(torch.random.get_rng_state(), rng) and str(tmp_path) not in sys.path


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to no file or no heading: {broken}"


SECTION_NAMED = re.compile(r'\b(?:see|section) "([^"]+)"', re.I)
"""A section named in words ('see "Use with verl"'), which no link check reads: it must be a heading somewhere."""


def test_sections_named_in_words_exist() -> None:
    # a section named in quotes instead of linked escapes test_every_relative_link_resolves: peers.md once sent
    # readers to "Use with verl", a heading no page had; a named section must be a heading of some page
    headings = {h for page in PAGES for h in anchors(page)}
    missing = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for title in SECTION_NAMED.findall(text):
            if anchors_of_title(title) not in headings:
                missing.append(f"{page.relative_to(ROOT)}: {title!r}")
    assert not missing, f"sections named in words that no page has (link them instead): {missing}"
    assert SECTION_NAMED.findall('as the trainer does (see "Use with verl")') == ["Use with verl"]


def anchors_of_title(title: str) -> str:
    """The anchor GitHub gives a heading of this title (as :func:`anchors` computes it)."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title.strip().lower()))


INDEX_INSTALL = re.compile(r"pip install ['\"]?drgrpo\[")
"""An install from a package index (``pip install drgrpo[trl]``): drgrpo is on none, so it fails."""


def test_install_instructions_work_from_a_clone() -> None:
    # drgrpo is installed from a clone (scripts/setup.sh, or pip install -e '.[extra]'): a page, a recipe, a
    # script or an error message that says pip install drgrpo[...] sends the reader to an index that lacks it
    files = [*PAGES, *(ROOT / "recipes").rglob("*"), *(ROOT / "scripts").rglob("*"), *(ROOT / "src").rglob("*.py")]
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in files
        if path.is_file() and path.suffix in {".md", ".py", ".sh", ".yaml", ""}
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if INDEX_INSTALL.search(line)
    ]
    assert not found, f"install lines that need drgrpo on a package index: {found}"
    assert INDEX_INSTALL.search("pip install 'drgrpo[deepspeed]'")
    assert not INDEX_INSTALL.search("pip install -e '.[trl]'")
