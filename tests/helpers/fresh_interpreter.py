"""What a fresh interpreter imports: one ``python`` process answers the import checks of several test modules.

An interpreter start with torch costs seconds, so ``import_report`` runs one, once per session, and returns:

- ``loaded``: for each module of ``EXTRAS``, whether it is in ``sys.modules`` after ``import drgrpo`` and a
  preset lookup (the core must not load an extra);
- ``without_trl``: then, with every ``trl`` import made to fail, the message of the ``ImportError`` that
  ``import drgrpo.integrations.trl`` raises (``None`` if it imported);
- ``core_version``: ``drgrpo.__version__`` read after that failure (the core still works without TRL);
- ``command_loaded``: for each module of ``EXTRAS``, whether it is in ``sys.modules`` once the ``drgrpo`` command's
  module is imported too (still without TRL): what every ``drgrpo`` process pays before it reads its arguments.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
from typing import Any

EXTRAS = ("transformers", "tokenizers", "safetensors", "matplotlib", "rich", "trl")

_CODE = textwrap.dedent(
    """
    import importlib.abc, json, sys
    import drgrpo
    drgrpo.LossConfig.preset("dapo")
    loaded = {name: name in sys.modules for name in EXTRAS}

    class NoTRL(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "trl" or name.startswith("trl."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoTRL())
    try:
        import drgrpo.integrations.trl
        without_trl = None
    except ImportError as error:
        without_trl = str(error)
    import drgrpo
    import drgrpo.train.cli.main
    command_loaded = {name: name in sys.modules for name in EXTRAS}
    report = {"loaded": loaded, "without_trl": without_trl, "core_version": drgrpo.__version__}
    print(json.dumps({**report, "command_loaded": command_loaded}))
    """
)


@functools.cache
def import_report() -> dict[str, Any]:
    """The fresh interpreter's answers (see the module docstring); computed once per session, read-only."""
    code = f"EXTRAS = {list(EXTRAS)!r}\n{_CODE}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
