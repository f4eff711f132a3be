"""The package's import structure: no cycles, no private names across modules, a light ``import drgrpo``.

The imports are read from the source with ``ast`` (every ``import`` statement, at any depth: inside
functions and ``TYPE_CHECKING`` blocks too), so a cycle hidden behind a lazy import still fails.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from helpers.fresh_interpreter import EXTRAS, import_report

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "drgrpo"

# The library core may import only these third-party packages; the rest lives under these subpackages.
CORE_THIRD_PARTY = {"numpy", "torch"}
EXTRA_SUBPACKAGES = ("drgrpo.train", "drgrpo.integrations")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in the file."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            # "from pkg import submodule" imports the submodule
            subs = [n for n in names if f"{target}.{n}" in known]
            out += [(f"{target}.{n}", [], node.lineno) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest:
                out.append((target, rest, node.lineno))
    return out


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _, _ in imports_of(path, name, known):
            if target in known and target != name:
                graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_cycle_finder_finds_a_cycle():
    # the oracle itself can fail: a three-module ring and a self-contained pair are found, a chain is not
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": set(), "f": {"g"}, "g": {"f"}}
    assert find_cycles(graph) == [["a", "b", "c"], ["f", "g"]]


def test_src_has_no_import_cycles():
    cycles = find_cycles(internal_graph())
    assert not cycles, (
        "import cycles in src/ (modules that import each other, directly or through others): "
        + "; ".join(" <-> ".join(c) for c in cycles)
    )


def test_no_module_imports_another_modules_private_names():
    mods = modules()
    offenders = []
    for name, path in mods.items():
        for target, names, line in imports_of(path, name, set(mods)):
            if target.startswith("drgrpo") and target != name:
                offenders += [
                    f"{path.relative_to(SRC)}:{line} takes {n} from {target}" for n in names if n.startswith("_")
                ]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_core_modules_import_only_numpy_and_torch():
    stdlib = set(sys.stdlib_module_names)
    mods = modules()
    offenders = []
    for name, path in mods.items():
        if name.startswith(EXTRA_SUBPACKAGES) or name == "drgrpo.__main__":
            continue
        for target, _, line in imports_of(path, name, set(mods)):
            top = target.split(".")[0]
            if top not in stdlib and top != "drgrpo" and top not in CORE_THIRD_PARTY:
                offenders.append(f"{path.relative_to(SRC)}:{line} imports {target}")
            if any(target == sub or target.startswith(sub + ".") for sub in EXTRA_SUBPACKAGES):
                offenders.append(f"{path.relative_to(SRC)}:{line} imports {target} (needs an extra)")
    assert not offenders, "the core must need only numpy and torch:\n" + "\n".join(offenders)


@pytest.mark.parametrize("extra_module", EXTRAS)
def test_import_drgrpo_loads_no_extra(extra_module: str) -> None:
    # one fresh interpreter answers for every extra (tests/helpers/fresh_interpreter.py)
    assert import_report()["loaded"][extra_module] is False


@pytest.mark.parametrize("extra_module", ["transformers", "tokenizers", "matplotlib", "rich", "trl"])
def test_the_drgrpo_command_loads_no_model_library_before_it_needs_one(extra_module: str) -> None:
    # importing transformers' Llama costs about 3 s of CPU: `drgrpo --help`, a bad flag or a missing file answer
    # without it (the model, plot and progress code import theirs on use)
    assert import_report()["command_loaded"][extra_module] is False


def test_every_public_name_imports():
    import drgrpo

    missing = [n for n in drgrpo.__all__ if not hasattr(drgrpo, n)]
    assert not missing
    # the registry is complete after import drgrpo: core and peer presets both
    assert {"dr_grpo", "grpo", "dapo", "trl.dr_grpo", "verl.grpo", "oat.drgrpo"} <= set(drgrpo.preset_names())


# --------------------------------------------------------------------------- the tests' own imports

TESTS = Path(__file__).resolve().parent


def imports_of_test_modules(path: Path, root: Path) -> list[str]:
    """The imports of a test module in ``path``, at any depth, as "FILE:LINE imports MODULE".

    A test module is a ``test_*`` module or anything under a ``tests`` package; ``from pkg import test_x``
    imports ``pkg.test_x``.
    """

    def is_test(module: str) -> bool:
        return any(part.startswith("test_") or part == "tests" for part in module.split("."))

    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if is_test(alias.name)]
        elif isinstance(node, ast.ImportFrom) and is_test(node.module or ""):
            found.append((node.module or "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module or ''}.{alias.name}".lstrip(".") for alias in node.names]
            found += [(name, node.lineno) for name in names if is_test(name)]
    return [f"{path.relative_to(root)}:{line} imports {module}" for module, line in found]


def test_the_test_import_check_finds_each_kind(tmp_path: Path):
    module = tmp_path / "test_example.py"
    module.write_text(
        "import os\nimport tests.train.test_cli\nfrom helpers.cli_runs import TINY\nfrom train import test_faults\n"
        "\n\ndef f():\n    from test_cli import ENV\n"
    )
    assert imports_of_test_modules(module, tmp_path) == [
        "test_example.py:2 imports tests.train.test_cli",
        "test_example.py:4 imports train.test_faults",
        "test_example.py:8 imports test_cli",
    ]


def test_no_test_module_imports_another():
    # what test modules share lives in tests/helpers/ (or batches.py, verl_env.py), never in a test module
    found = [hit for path in sorted(TESTS.rglob("*.py")) for hit in imports_of_test_modules(path, TESTS.parent)]
    assert found == [], "\n".join(found)


def sys_path_edits(path: Path, root: Path) -> list[str]:
    """Every ``sys.path.insert``, ``append`` or ``extend`` in ``path``, as "FILE:LINE"."""
    return [
        f"{path.relative_to(root)}:{node.lineno}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr in {"insert", "append", "extend"}
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "path"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "sys"
    ]


def test_the_sys_path_check_finds_an_edit(tmp_path: Path):
    module = tmp_path / "conftest.py"
    module.write_text("import sys\n\nsys.path.insert(0, 'x')\nsys.path.remove('x')\nsys.path.append('y')\n")
    assert sys_path_edits(module, tmp_path) == ["conftest.py:3", "conftest.py:5"]


def test_no_test_edits_sys_path():
    # tests/ and benchmarks/ are on the tests' import path through pyproject.toml's pytest ``pythonpath``
    edits = [hit for path in sorted(TESTS.rglob("*.py")) for hit in sys_path_edits(path, TESTS.parent)]
    assert edits == [], edits


# --------------------------------------------------------------------------- the layers of drgrpo.train

LAYERS = {
    "drgrpo.train.cli": ("drgrpo.train.cli", "drgrpo.train.loop", "drgrpo.train.run"),
    "drgrpo.train.loop": ("drgrpo.train.loop", "drgrpo.train.run"),
    "drgrpo.train.run": ("drgrpo.train.run",),
}
"""What each package of ``drgrpo.train`` may import from it besides its leaves (docs/design.md, section 10): arrows
point down only, cli -> loop -> run."""
LEAVES = ("drgrpo.train.train_config", "drgrpo.train.flags")
"""Modules every layer may import: TrainConfig and the generic flag builder, which import only the core (and
train_config the flag builder)."""


ENTRY_POINTS = ("drgrpo.train", "drgrpo.__main__")
"""Modules that may import every layer: the package's API (re-exports) and ``python -m drgrpo`` (the command)."""


def layer_of(module: str) -> str:
    """The layer a module of ``drgrpo`` belongs to: a package of LAYERS, a leaf, an entry point, or the core."""
    if module in ENTRY_POINTS:
        return "entry"
    for layer in (*LAYERS, *LEAVES):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "core"


def allowed(importer: str, target: str) -> bool:
    """Whether module ``importer`` may import module ``target`` (both in ``drgrpo``)."""
    source, dest = layer_of(importer), layer_of(target)
    if source == "entry":
        return True
    if source == "core":  # the core and integrations never import the trainer
        return not (target == "drgrpo.train" or target.startswith("drgrpo.train."))
    if dest == "core":
        return True
    if source in LEAVES:
        return dest in LEAVES
    return dest in LEAVES or dest in LAYERS[source]


def upward_imports(mods: dict[str, Path], root: Path = SRC) -> list[str]:
    """Every import in ``mods`` (at any depth) that :func:`allowed` refuses, as "FILE:LINE: MODULE imports TARGET"."""
    known = set(mods)
    return [
        f"{path.relative_to(root)}:{line}: {name} imports {target}"
        for name, path in mods.items()
        for target, _, line in imports_of(path, name, known)
        if target.startswith("drgrpo") and not allowed(name, target)
    ]


def test_the_layer_check_finds_an_upward_import(tmp_path: Path):
    # the oracle itself can fail: run importing loop, loop importing cli (lazily), the leaf importing run and the
    # core importing the trainer are found; loop importing run, cli importing loop and the leaves are not
    root = tmp_path / "drgrpo" / "train"
    sources = {
        "run/a.py": "from drgrpo.train.loop.b import x\n",
        "loop/b.py": "from drgrpo.train.run import a\n\n\ndef f():\n    import drgrpo.train.cli.c\n",
        "cli/c.py": "from drgrpo.train.loop import b\nfrom drgrpo.train.train_config import T\n",
        "train_config.py": "from drgrpo.train.run.a import y\nfrom drgrpo.train.flags import add_flags\n",
    }
    mods = {}
    for rel, text in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        mods["drgrpo.train." + rel.removesuffix(".py").replace("/", ".")] = root / rel
    (tmp_path / "drgrpo" / "core.py").write_text("import drgrpo.train.train_config\nimport torch\n")
    mods["drgrpo.core"] = tmp_path / "drgrpo" / "core.py"
    assert upward_imports(mods, tmp_path) == [
        "drgrpo/train/run/a.py:1: drgrpo.train.run.a imports drgrpo.train.loop.b",
        "drgrpo/train/loop/b.py:5: drgrpo.train.loop.b imports drgrpo.train.cli.c",
        "drgrpo/train/train_config.py:1: drgrpo.train.train_config imports drgrpo.train.run.a",
        "drgrpo/core.py:1: drgrpo.core imports drgrpo.train.train_config",
    ]


def test_train_imports_point_down_only():
    # cli -> loop -> run -> train_config -> the core; the core and integrations never import drgrpo.train
    found = upward_imports(modules())
    assert found == [], "imports against the layers of drgrpo.train (docs/design.md, section 10):\n" + "\n".join(found)


# --------------------------------------------------------------------------- the oracle's names

REFERENCE = "drgrpo.reference"


def public_definitions(path: Path) -> list[str]:
    """The functions and classes a module defines at its top level whose names do not start with ``_``."""
    return [
        node.name
        for node in ast.parse(path.read_text()).body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_")
    ]


def oracle_name_clashes(mods: dict[str, Path], package: str = "drgrpo") -> list[str]:
    """Each public function or class of ``<package>.reference`` that shares its name with a public name of
    ``package``: a function or class another of its modules defines, or one of its direct submodules."""
    owners: dict[str, list[str]] = {}
    for name, path in mods.items():
        if name == f"{package}.reference":
            continue
        if name.count(".") == 1:  # "from drgrpo import kl" gives the submodule
            owners.setdefault(name.rsplit(".", 1)[1], []).append(f"the module {name}")
        for defined in public_definitions(path):
            owners.setdefault(defined, []).append(f"{name}.{defined}")
    return [
        f"{package}.reference.{defined} shares its name with {', '.join(owners[defined])}: call it oracle_{defined}"
        for defined in public_definitions(mods[f"{package}.reference"])
        if defined in owners
    ]


def test_the_oracle_name_check_finds_each_kind(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "train").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.loss import policy_loss\n")
    (package / "loss.py").write_text("def policy_loss(x):\n    pass\n\n\ndef _private():\n    pass\n")
    (package / "kl.py").write_text("")
    (package / "train" / "__init__.py").write_text("")
    (package / "train" / "rollout.py").write_text("class Rollout:\n    pass\n")
    (package / "reference.py").write_text(
        "def policy_loss(x):\n    def kl():\n        pass\n\n\ndef kl():\n    pass\n\n\nclass Rollout:\n    pass\n\n\n"
        "def _private():\n    pass\n\n\ndef oracle_policy_loss():\n    pass\n\n\ndef rollout():\n    pass\n"
    )
    mods = {
        name: tmp_path / path
        for name, path in [
            ("pkg", "pkg/__init__.py"),
            ("pkg.loss", "pkg/loss.py"),
            ("pkg.kl", "pkg/kl.py"),
            ("pkg.train", "pkg/train/__init__.py"),
            ("pkg.train.rollout", "pkg/train/rollout.py"),
            ("pkg.reference", "pkg/reference.py"),
        ]
    }
    # a nested function, a private one, a prefixed one and a deeper module's name ("rollout") are no clash
    assert oracle_name_clashes(mods, "pkg") == [
        "pkg.reference.policy_loss shares its name with pkg.loss.policy_loss: call it oracle_policy_loss",
        "pkg.reference.kl shares its name with the module pkg.kl: call it oracle_kl",
        "pkg.reference.Rollout shares its name with pkg.train.rollout.Rollout: call it oracle_Rollout",
    ]


def test_no_oracle_function_shares_a_public_name():
    # drgrpo.reference.policy_loss beside drgrpo.policy_loss, with another signature, hides which one an import holds
    clashes = oracle_name_clashes(modules())
    assert clashes == [], "\n".join(clashes)
    # and the package's own namespace, as imported, agrees
    import drgrpo

    public = {n for n in dir(drgrpo) if not n.startswith("_")}
    assert sorted(public & set(public_definitions(PACKAGE / "reference.py"))) == []
