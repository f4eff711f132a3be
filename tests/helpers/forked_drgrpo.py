"""``drgrpo`` commands started from an interpreter that has imported drgrpo already (a fork server).

A ``drgrpo`` process spends 3-5 s of a quiet 2-core CPU (15-20 s under load) importing torch and transformers
before it does anything. The docs' blocks run about twenty ``drgrpo`` commands, so ``tests/test_docs.py`` puts
a stand-in first on their PATH: it hands its arguments, working directory, environment and standard streams to a
server that imported :mod:`drgrpo.train.cli.main` once; the server forks a child that runs the console script's
``main`` with them, as its own process, and the stand-in exits with the child's status (a signal it receives is
passed on). The child is the process a fresh ``drgrpo`` would be, minus the imports: ``sys.argv``,
``sys.path`` (the console script's directory, then ``PYTHONPATH``), the environment and the streams are the
command's; it ends as the interpreter would, by the atexit handlers and flushed streams (:func:`finish`).

Where the two could differ, the stand-in runs the real console script instead: no server, or an environment
that differs from the server's in a variable read at import time (anything but :data:`PER_COMMAND`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import traceback
from pathlib import Path

PER_COMMAND = frozenset({"PYTHONPATH", "PWD", "OLDPWD", "SHLVL", "_"})
"""Variables a command may set differently from the server's environment: none of them is read at import time
(``PYTHONPATH`` is applied to the child's ``sys.path``)."""

STAND_IN = """#!{python} -S
# drgrpo through the docs tests' fork server (tests/helpers/forked_drgrpo.py); the real one when it cannot serve
import json, os, signal, socket, sys

REAL, SERVER = {real!r}, {server!r}
try:
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    link.connect(SERVER)
    request = json.dumps({{"argv": [REAL, *sys.argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ)}})
    socket.send_fds(link, [request.encode() + b"\\n"], [0, 1, 2])
    reply = link.makefile("r")
    pid = int(reply.readline() or 0)
except OSError:
    pid = 0
if pid <= 0:
    os.execv(REAL, [REAL, *sys.argv[1:]])
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda s, _: os.kill(pid, s))
status = int(reply.readline())
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def write_stand_in(bin_dir: Path, real: Path, server: Path) -> Path:
    """Write the stand-in ``drgrpo`` into ``bin_dir`` (to put first on PATH); it talks to the server at ``server``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "drgrpo"
    path.write_text(STAND_IN.format(python=sys.executable, real=str(real), server=str(server)))
    path.chmod(0o755)
    return path


def serve(address: str) -> None:
    """Import drgrpo's command line, then fork one child per request on the Unix socket ``address``; forever."""
    own_env = {k: v for k, v in os.environ.items() if k not in PER_COMMAND}
    import transformers  # what every run imports on use: the model and tokenizer classes (no torch op runs)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import drgrpo.train.cli.main  # noqa: F401  (what every child would import first)

    transformers.PreTrainedTokenizerFast  # noqa: B018  (a lazy attribute: this imports it)

    # what the imports set (torch: TORCHINDUCTOR_CACHE_DIR), as they would in a fresh process
    imported_env = {k: v for k, v in os.environ.items() if own_env.get(k) != v and k not in PER_COMMAND}
    gc.freeze()  # the children's collections leave the imported objects alone (fewer copied pages)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the stand-in's connection
    while True:
        readable, _, _ = select.select([listener], [], [], 0.02)
        if readable:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            buffer = message
            while not buffer.endswith(b"\n"):
                buffer += conn.recv(1 << 20)
            request = json.loads(buffer)
            env = request["env"]
            differ = sorted(k for k in {*env, *own_env} - PER_COMMAND if env.get(k) != own_env.get(k))
            if differ or len(fds) != 3:
                print(f"real console script: the environment differs in {differ}", file=sys.stderr, flush=True)
                conn.sendall(b"0\n")  # the stand-in runs the real console script
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for child in waiting.values():
                    child.close()
                run_child(request, fds, imported_env)  # ends the child
            for fd in fds:
                os.close(fd)
            print(f"forked {pid}: {request['argv'][1:]}", file=sys.stderr, flush=True)  # the log the tests read
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        for pid in list(waiting):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = waiting.pop(pid)
                with contextlib.suppress(OSError):  # the stand-in may be gone
                    conn.sendall(f"{status}\n".encode())
                conn.close()


def run_child(request: dict, fds: list[int], imported_env: dict[str, str]) -> None:
    """In the forked child: become the command (streams, directory, environment, argv, path) and run ``main``."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(imported_env)
    argv = request["argv"]
    sys.argv = list(argv)
    extra = [os.path.abspath(p) for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(argv[0]), *extra, *sys.path[1:]]
    from drgrpo.train.cli.main import main

    try:
        code = exit_code(main())
    except SystemExit as stop:
        code = exit_code(stop.code)
    except KeyboardInterrupt:  # as the interpreter ends on one: killed by SIGINT
        finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    finish()
    os._exit(code)


def exit_code(value: object) -> int:
    """The status the interpreter exits with for ``sys.exit(value)``."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def finish() -> None:
    """The end of the interpreter's exit that a command can see: atexit handlers, then the streams flushed.

    The rest (tearing down torch's and transformers' modules, 4 s on a loaded 2-core machine) is left out: the
    child ends with ``os._exit``. Output left in an unclosed file object would be lost, not kept: a command that
    relied on it would fail here."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
