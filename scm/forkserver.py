"""Warm start for a study's many short `scm` processes: a fork server (`scm serve`).

Snakemake runs every job as a process of its own, and each `scm` process pays Python's start-up and
`import torch` (~2 s on the 2-core CPU machine) and, for evaluations, torch-fidelity with torchvision
(~1.6 s) before any work: with ~70 jobs that is most of the default study's overhead (docs/benchmarks.md).
`scm serve` imports those modules once and forks one child per command. When the environment variable
SCM_SERVER names a server's socket, the `scm` entry point hands its command to the server (argv, working
directory, environment, and its own stdin, stdout and stderr as file descriptors) and waits, forwarding
signals; the forked child runs the command as `scm` would have (same files, output and exit status), the
imports already done. `make run` starts a server for the study and stops it afterwards.

A child is as fresh as a new process: the server runs no torch work (no threads, no initialised
backends before the fork), each command gets a child of its own, and the child re-seeds Python's and
numpy's global generators, forgets the cached temporary directory and applies OMP_NUM_THREADS as torch
would at start-up. The server declines a command (the client runs it itself) when that is not enough:
another Python installation, a variable that the libraries read once at import (other than the thread
counts Snakemake sets per job), or a source file of the `scm` package changed since the server imported it.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

ENV = "SCM_SERVER"
# What `scm serve` imports by default: torch and everything the study's commands import on top of it.
PRELOAD = ("torch", "torch_fidelity", "scm.train", "scm.evaluate", "scm.eval_shards", "scm.launch",
           "scm.metrics", "scm.extractors", "scm.sweep")
# Variables the libraries read once, at import: a client whose values differ runs the command itself.
IMPORT_TIME_PREFIXES = ("PYTHON", "LD_", "TORCH", "PYTORCH_", "CUDA_", "NCCL_", "KMP_", "GOMP_", "DNNL_",
                        "ONEDNN_", "MALLOC_", "TRITON_", "MPLBACKEND", "MPLCONFIGDIR")
# Thread counts Snakemake sets per job (the job's threads): the child applies OMP_NUM_THREADS itself.
THREAD_VARS = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

PARENT_POLL_S = 2  # how often the server checks that the process that started it is still there
REQUEST_TIMEOUT_S = 10  # reading a request; a command's child then waits on its client without a limit

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Messages: a 4-byte length, then JSON.


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    packet = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [packet], fds)
    else:
        sock.sendall(packet)


def _recv_exact(sock: socket.socket, n: int, head: bytes = b"") -> bytes:
    data = head
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def _recv(sock: socket.socket, want_fds: int = 0) -> tuple[dict, list[int]]:
    """One message (and the descriptors sent with it); EOFError when the peer has gone."""
    fds: list[int] = []
    if want_fds:
        head, fds, _, _ = socket.recv_fds(sock, 65536, want_fds)
        if not head:
            raise EOFError("connection closed")
    else:
        head = b""
    head = _recv_exact(sock, 4, head)
    (size,) = struct.unpack("!I", head[:4])
    body = _recv_exact(sock, 4 + size, head)[4:]
    return json.loads(body), fds


# ----------------------------------------------------------------------------
# Client: the `scm` entry point.


def delegate(argv: list[str]) -> tuple[int | None, str]:
    """Run `scm argv[1:]` in the server named by SCM_SERVER: (its exit status, ""); (None, why) when the
    server declined and (None, "") when there is none: the caller then runs the command itself."""
    path = os.environ.get(ENV)
    if not path:
        return None, ""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None, ""
    with sock:
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "prefix": sys.prefix}
        try:
            _send(sock, request, [0, 1, 2])
            reply, _ = _recv(sock)
        except (OSError, EOFError):
            return None, ""
        if "declined" in reply:
            return None, f"the fork server declined ({reply['declined']}); running here"
        pid = reply["pid"]
        previous = {sig: signal.signal(sig, lambda signum, frame: _forward(pid, signum))
                    for sig in FORWARDED_SIGNALS}
        try:
            reply, _ = _recv(sock)
        except EOFError:  # the server and the child both went without a word: report a failure
            return 1, f"the fork server's child {pid} ended without an exit status"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return _exit_status(reply["exit"]), ""


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _exit_status(code: int) -> int:
    """The child's status as this process's: a child killed by signal N kills this process with N too."""
    if code >= 0:
        return code
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    return 128 - code


# ----------------------------------------------------------------------------
# Server.


def _source_files() -> dict[str, float]:
    """Modification times of the imported `scm` modules' files (a change makes the server decline)."""
    out = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (name == "scm" or name.startswith("scm.")) and path:
            out[path] = os.stat(path).st_mtime_ns
    return out


def _import_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


def decline_reason(request: dict, sources: dict[str, float], server_env: dict,
                   set_by_import: frozenset = frozenset()) -> str | None:
    """Why the server cannot run this command as a fresh process would (None: it can)."""
    if request.get("prefix") != sys.prefix:
        return f"client Python {request.get('prefix')} is not the server's {sys.prefix}"
    ours = _import_env(server_env)
    theirs = _import_env({**{k: server_env[k] for k in set_by_import}, **request["env"]})
    if ours != theirs:
        changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        return f"environment differs in {', '.join(changed)}"
    for path, mtime in sources.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return f"{path} changed since the server started"
        except OSError:
            return f"{path} is gone"
    return None


def serve(path: str | Path, preload: tuple[str, ...] = PRELOAD) -> None:
    """Import `preload`, listen on `path`, then fork a child per command until SIGTERM or SIGINT, or until the
    process that started the server is gone."""
    path, parent = str(path), os.getppid()
    try:
        os.setsid()  # the terminal's Ctrl-C reaches the clients, which forward it: once, not twice
    except OSError:
        pass
    server_pid, before = os.getpid(), dict(os.environ)
    for name in preload:
        importlib.import_module(name)
    sources, server_env = _source_files(), dict(os.environ)
    # Variables the imports set (torch._inductor: its cache folder): a client that lacks them would set them
    # the same way on import.
    set_by_import = frozenset(k for k in server_env if before.get(k) != server_env[k])
    # Listening under a temporary name, then renamed: a client finds the socket only once it is served.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}.{server_pid}")
    listener.listen(128)
    os.rename(f"{path}.{server_pid}", path)
    try:
        log.info("fork server on %s: %d modules imported (%s)", path, len(sys.modules), ", ".join(preload))
        _serve_loop(listener, sources, server_env, set_by_import, parent)
    finally:
        if os.getpid() == server_pid:
            listener.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _serve_loop(listener: socket.socket, sources: dict[str, float], server_env: dict,
                set_by_import: frozenset, parent: int) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    stop = []
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wake-up pipe
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    children: dict[int, socket.socket] = {}
    while not stop:
        try:
            ready, _, _ = select.select([listener, wake_r], [], [], PARENT_POLL_S)
        except InterruptedError:
            continue
        if os.getppid() != parent:  # whoever started the server is gone (make killed): stop, not linger
            log.info("fork server: its parent %d exited", parent)
            break
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            _reap(children)
        if listener in ready and not stop:
            conn, _ = listener.accept()
            _accept(conn, listener, children, (sources, server_env, set_by_import), (wake_r, wake_w))
    log.info("fork server stopping (%d commands still running finish on their own)", len(children))


def _reap(children: dict[int, socket.socket]) -> None:
    """Send each finished child's exit status to its client (a child killed by a signal sends none itself)."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            try:
                _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
            except OSError:
                pass
            conn.close()


def _accept(conn, listener, children, checks: tuple, wake) -> None:
    conn.settimeout(REQUEST_TIMEOUT_S)
    try:
        request, fds = _recv(conn, want_fds=3)
    except (OSError, EOFError, ValueError) as e:
        log.warning("fork server: a bad request (%s)", e)
        conn.close()
        return
    reason = decline_reason(request, *checks) if len(fds) == 3 else "no stdio descriptors"
    if reason:
        try:
            _send(conn, {"declined": reason})
        except OSError:  # the client went meanwhile: nothing to tell
            pass
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        _child(conn, request, fds, closing=[listener, *children.values()], wake=wake)
    command = " ".join(request["argv"][1:])
    log.info("pid %d: %s", pid, command if len(command) <= 300 else command[:300] + " ...")
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    children[pid] = conn
    try:
        _send(conn, {"pid": pid})
    except OSError:
        pass


def _child(conn, request: dict, fds: list[int], closing: list[socket.socket], wake: tuple[int, int]) -> None:
    """In the forked child: become the client's process (stdio, cwd, environment), run the command, exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        conn.settimeout(None)  # the server's request timeout must not end the command's watch on its client
        for s in closing:
            s.close()
        for fd in wake:
            os.close(fd)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]  # out of 0-2 first: no overlap
        for fd in fds:
            os.close(fd)
        for target, fd in enumerate(high):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _fresh_process_state()
        done = threading.Event()
        threading.Thread(target=_exit_with_client, args=(conn, done), daemon=True).start()
        sys.argv = list(request["argv"])
        code = _run(sys.argv[1:])
        done.set()
        try:
            _send(conn, {"exit": code})
        except OSError:
            pass
    finally:
        os._exit(code)


def _fresh_process_state() -> None:
    """What a new interpreter would do differently from a fork of the server."""
    import io
    import random
    import tempfile

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, errors="backslashreplace")
    logging.root.handlers.clear()  # the command's logging.basicConfig sets up its own
    tempfile.tempdir = None  # TMPDIR is the client's (Snakemake sets it per job)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))  # torch's start-up default from the variable


def _exit_with_client(conn: socket.socket, done: threading.Event) -> None:
    """The client went away (killed, or its job cancelled): stop the command as SIGTERM would."""
    try:
        while conn.recv(1024):
            pass
    except ConnectionError:
        pass
    except OSError:  # not a sign that the client went: keep the command running
        return
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGTERM)


def _run(argv: list[str]) -> int:
    import traceback

    from scm.cli import run

    try:
        code = run(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        import atexit

        atexit._run_exitfuncs()  # what the interpreter runs at exit (os._exit skips it)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return int(code)
