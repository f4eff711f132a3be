"""``drgrpo`` and ``python`` commands started from an interpreter that has imported torch already (a fork server).

A ``drgrpo`` or ``python`` process spends 3-8 s of a quiet 2-core CPU (15-20 s under load) importing torch and
transformers before it does anything. The docs' blocks run about twenty ``drgrpo`` commands and as many python
scripts (benchmarks, analyses, the TRL command line, and the children those start with ``sys.executable``), so
``tests/test_docs.py`` puts two stand-ins first on their PATH, ``drgrpo`` and ``python``: each hands its
arguments, working directory, environment and standard streams to a server that imported drgrpo's command line
and what the scripts use (:data:`PRELOADED`) once; the server forks a child that becomes the command, as its own
process, and the stand-in exits with the child's status (a signal it receives is passed on).

The child is the process a fresh interpreter would be, minus the imports: the environment, the streams and the
working directory are the command's, and so are ``sys.argv`` and ``sys.path`` as Python sets them (the console
script's or the script's directory, the working directory for ``-m``, ``''`` for ``-c`` and ``-``; then
``PYTHONPATH``). A ``drgrpo`` child runs the console script's ``main``; a ``python`` child runs ``python
FILE.py``, ``-m MODULE``, ``-c CODE`` or ``-`` (the script on stdin) as ``__main__`` (:func:`run_python`), with
``sys.executable`` naming the stand-in, so that the script's own ``[sys.executable, ...]`` children are served
too, while :mod:`multiprocessing` keeps the real interpreter (its spawned children take extra descriptors). Both
end as the interpreter would: threads joined, atexit handlers, streams flushed (:func:`finish`), the exit status
of ``sys.exit`` or 1 after the traceback of an uncaught exception.

Where the two could differ, the stand-in runs the real command instead: any other python invocation (an option
such as ``-u`` or ``-X``, no arguments), no server, an environment that differs from the server's in a variable
read at import time (anything but :data:`PER_COMMAND`), or a directory on the child's ``sys.path`` that holds
another copy of a module the server imported. The server's log has a line for each: ``forked PID: ...`` or
``real COMMAND (why): ...``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import types
from importlib.machinery import BuiltinImporter, SourceFileLoader
from pathlib import Path

PER_COMMAND = frozenset({"PYTHONPATH", "PWD", "OLDPWD", "SHLVL", "_"})
"""Variables a command may set differently from the server's environment: none of them is read at import time
(``PYTHONPATH`` is applied to the child's ``sys.path``)."""

PRELOADED = (
    "drgrpo.train.cli.main",  # every drgrpo command
    "drgrpo.train",
    "drgrpo.length_bias",  # docs/length-bias/mechanism.py
    "transformers.models.llama.modeling_llama",  # the tiny Llama: 2 s of the scripts' imports
    "transformers.models.auto.modeling_auto",  # what a run imports on use (drgrpo's command does not import them)
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_tokenizers",
    "trl",
    "drgrpo.integrations.trl",  # TRL's trainer, datasets
    "matplotlib.pyplot",  # the analyses' figures (MPLBACKEND=Agg in the blocks)
    "multiprocessing.spawn",  # reads sys.executable now: python children keep this interpreter for spawning
)
"""What the server imports before it forks (none runs a torch operation: no thread pool is started)."""

STAND_IN = """#!{python} -S
# {name} through the docs tests' fork server (tests/helpers/forked_drgrpo.py); the real one when it cannot serve
import json, os, signal, socket, sys

NAME, REAL, SERVER = {name!r}, {real!r}, {server!r}
args = sys.argv[1:]
# python FILE.py, -m MODULE, -c CODE, - (stdin): the forms the server runs; the real interpreter runs any other
served = NAME != "python" or (bool(args) and (
    (args[0] in ("-m", "-c") and len(args) > 1)
    or args[0] == "-"
    or (not args[0].startswith("-") and args[0].endswith(".py") and os.path.isfile(args[0]))
))
pid = 0
if served:
    try:
        link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        link.connect(SERVER)
        request = {{"command": NAME, "argv": [REAL, *args], "executable": os.path.abspath(__file__),
                    "cwd": os.getcwd(), "env": dict(os.environ)}}
        socket.send_fds(link, [json.dumps(request).encode() + b"\\n"], [0, 1, 2])
        reply = link.makefile("r")
        pid = int(reply.readline() or 0)
    except OSError:
        pid = 0
if pid <= 0:
    os.execv(REAL, [REAL, *args])
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda s, _: os.kill(pid, s))
status = int(reply.readline())
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def write_stand_in(bin_dir: Path, real: Path, server: Path, name: str = "drgrpo") -> Path:
    """Write the stand-in ``name`` (``drgrpo`` or ``python``) into ``bin_dir`` (to put first on PATH); it runs
    ``real`` when the server at ``server`` cannot serve the command."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(STAND_IN.format(python=sys.executable, name=name, real=str(real), server=str(server)))
    path.chmod(0o755)
    return path


def serve(address: str) -> None:
    """Import :data:`PRELOADED`, then fork one child per request on the Unix socket ``address``; forever."""
    own_env = {k: v for k, v in os.environ.items() if k not in PER_COMMAND}
    for name in PRELOADED:
        importlib.import_module(name)

    # what the imports set (torch: TORCHINDUCTOR_CACHE_DIR), as they would in a fresh process
    imported_env = {k: v for k, v in os.environ.items() if own_env.get(k) != v and k not in PER_COMMAND}
    gc.freeze()  # the children's collections leave the imported objects alone (fewer copied pages)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    print(f"imported {len(sys.modules)} modules; threads: {thread_names()}", file=sys.stderr, flush=True)
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
            shown = f"{request['command']} {[a if len(a) < 200 else a[:60] + ' ...' for a in request['argv'][1:]]}"
            why = "no standard streams" if len(fds) != 3 else not_served(request, own_env, imported_env)
            if why:
                print(f"real {shown} ({why})", file=sys.stderr, flush=True)
                conn.sendall(b"0\n")  # the stand-in runs the real command
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
            print(f"forked {pid}: {shown}", file=sys.stderr, flush=True)  # the log the tests read
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        for pid in list(waiting):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = waiting.pop(pid)
                with contextlib.suppress(OSError):  # the stand-in may be gone
                    conn.sendall(f"{status}\n".encode())
                conn.close()


def thread_names() -> list[str]:
    """The names of this process's threads (numpy's BLAS starts one; a torch thread pool would add more)."""
    tasks = Path("/proc/self/task")
    return [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.exists() else []


def not_served(request: dict, own_env: dict[str, str], imported_env: dict[str, str]) -> str:
    """Why a fresh process could differ from a child of this server for ``request`` ("" when it would not)."""
    env = request["env"]
    differ = sorted(
        k
        for k in {*env, *own_env} - PER_COMMAND
        if env.get(k) != own_env.get(k) and not (k in imported_env and env.get(k) == imported_env[k])
    )
    if differ:
        return f"the environment differs in {differ}"
    for entry in child_path(request)[:-1]:
        other = shadowing(entry)
        if other:
            return f"{entry} holds another {other}"
    return ""


def shadowing(entry: str) -> str:
    """A module (``NAME.py``) or package (a directory) in the directory ``entry`` that this server imported from
    elsewhere: a fresh process with ``entry`` on its path would import this one ("" when there is none)."""
    with contextlib.suppress(OSError):
        for found in os.scandir(entry or "."):
            name = found.name.removesuffix(".py") if found.name.endswith(".py") else found.name
            where = getattr(sys.modules.get(name), "__file__", None)
            if not where or name == "__main__" or (name == found.name and not found.is_dir()):
                continue
            mine, theirs = os.path.realpath(found.path), os.path.realpath(where)
            if theirs != mine and not theirs.startswith(mine + os.sep):
                return found.name
    return ""


def child_path(request: dict) -> list[str]:
    """The entries the command's ``sys.path`` starts with (Python's first one, then ``PYTHONPATH``'s), and ``''``."""
    argv, cwd = request["argv"], request["cwd"]
    first: str
    if request["command"] == "drgrpo":
        first = os.path.dirname(argv[0])
    elif argv[1] == "-m":
        first = cwd
    elif argv[1] in ("-c", "-"):
        first = ""
    else:
        first = os.path.dirname(os.path.realpath(os.path.join(cwd, argv[1])))
    extra = [os.path.join(cwd, p) for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    return [first, *map(os.path.normpath, extra), ""]


def run_child(request: dict, fds: list[int], imported_env: dict[str, str]) -> None:
    """In the forked child: become the command (streams, directory, environment, argv, path) and run it."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(imported_env)
    argv = request["argv"]
    sys.path[:] = [*child_path(request)[:-1], *sys.path[1:]]
    try:
        if request["command"] == "drgrpo":
            sys.argv = list(argv)
            from drgrpo.train.cli.main import main

            code = exit_code(main())
        else:
            run_python(argv[1:], request["executable"])
            code = 0
    except SystemExit as stop:
        code = exit_code(stop.code)
    except KeyboardInterrupt as error:  # as the interpreter ends on one: the traceback, then killed by SIGINT
        print_uncaught(error)
        finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException as error:
        print_uncaught(error)
        code = 1
    finish()
    os._exit(code)


def run_python(args: list[str], executable: str) -> None:
    """Run ``python ARGS`` (``FILE.py``, ``-m MODULE``, ``-c CODE`` or ``-``, then the script's arguments) here,
    as a fresh interpreter started as ``executable`` (the stand-in) would.

    :mod:`multiprocessing` keeps the server's interpreter (read when the server imported it): its spawned children
    take descriptors that the stand-in does not pass on."""
    sys.orig_argv = [executable, *args]
    sys.executable = executable  # the script's own [sys.executable, ...] children go through the stand-in
    if args[0] == "-m":
        sys.argv = ["-m", *args[2:]]  # runpy puts the module's path first, as python -m does
        sys.modules.pop(args[1], None)  # imported here, not in a fresh process: run it fresh, with no warning
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        return
    main = types.ModuleType("__main__")  # what the interpreter's __main__ holds for each form
    source: str | bytes
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        source, filename = args[1], "<string>"
        vars(main).update(__loader__=BuiltinImporter)
    elif args[0] == "-":
        sys.argv = list(args)
        source, filename = sys.stdin.buffer.read(), "<stdin>"
        vars(main).update(__loader__=BuiltinImporter, __file__=filename, __cached__=None)
    else:
        sys.argv = list(args)
        filename = os.path.abspath(args[0])
        source = Path(filename).read_bytes()
        vars(main).update(__loader__=SourceFileLoader("__main__", filename), __file__=filename, __cached__=None)
    sys.modules["__main__"] = main
    exec(compile(source, filename, "exec"), main.__dict__)


def print_uncaught(error: BaseException) -> None:
    """Print the traceback as the interpreter does for an uncaught exception: from the command's own code (this
    module's frames at the top dropped), by ``sys.excepthook``, which prints the exception's own traceback."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_globals is globals():
        tb = tb.tb_next
    sys.excepthook(type(error), error, error.with_traceback(tb).__traceback__)


def exit_code(value: object) -> int:
    """The status the interpreter exits with for ``sys.exit(value)``."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def finish() -> None:
    """The end of the interpreter's exit that a command can see: its threads joined, the atexit handlers, then the
    streams flushed.

    The rest (tearing down torch's and transformers' modules, 4 s on a loaded 2-core machine) is left out: the
    child ends with ``os._exit``. Output left in an unclosed file object would be lost, not kept: a command that
    relied on it would fail here."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
