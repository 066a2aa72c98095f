"""The fork server (`scm serve`, scm/forkserver.py): a command run through it behaves as the same command
run as a process of its own: output, exit status, files (bit-identical training), working directory,
signals; a killed client stops its command; the server declines what it cannot run as a fresh process.

Every comparison runs the command both ways; the server's log proves the served runs went through it.
No test depends on the machine's speed: deadlines only bound a test that fails."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scm import forkserver
from scm.checkpoint import list_checkpoints, read_status

from .test_faults import ENV, assert_same_weights, final_weights, stats_steps, wait_for, write_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with torch and the training code imported (the thread count of the tests' processes)."""
    folder = tmp_path_factory.mktemp("server")
    path, log_path = folder / "scm.sock", folder / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scm.cli", "serve", "--socket", str(path),
                                 "--preload", "torch,scm.train,scm.evaluate"], env=ENV, stdout=log, stderr=log)
    try:
        wait_for(lambda: path.exists() or proc.poll() is not None, "the server's socket", 120)
        assert proc.poll() is None, log_path.read_text()
        yield path, log_path
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        assert not path.exists()  # the server removes its socket


def scm(args, cwd, socket=None, env=None, **popen):
    env = {**ENV, **(env or {})}
    if socket:
        env[forkserver.ENV] = str(socket)
    cmd = [sys.executable, "-m", "scm.cli", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def served(log_path: Path, *words: str) -> int:
    """How many commands containing `words` the server forked."""
    return sum(1 for line in log_path.read_text().splitlines() if "pid " in line and all(w in line for w in words))


def test_output_and_exit_status_are_those_of_a_process_of_its_own(server, tmp_path):
    socket, log_path = server
    commands = [["info", "sizes", "--dataset", "shapes"],                               # stdout, status 0
                ["train", "--config", "missing.yaml", "--run-dir", "run"],              # one-line error, 2
                ["evaluate", "--run-dir", "run", "--steps", "0", "--out", "m.json"]]    # a bad value, 2
    for args in commands:
        alone, through = scm(args, tmp_path), scm(args, tmp_path, socket)
        assert (through.returncode, through.stdout, through.stderr) == (alone.returncode, alone.stdout, alone.stderr)
        assert served(log_path, *args[:2]) >= 1, args
    assert scm(commands[0], tmp_path).returncode == 0 and scm(commands[1], tmp_path).returncode == 2


def test_training_through_the_server_is_bit_identical_and_in_the_clients_directory(server, tmp_path):
    socket, log_path = server
    cfg = write_cfg(tmp_path, total_kimg=0.128, checkpoint_kimg=0.064)
    for name, sock in (("alone", None), ("through", socket)):
        (tmp_path / name).mkdir()
        result = scm(["train", "--config", str(cfg), "--run-dir", "run"], tmp_path / name, sock)
        assert result.returncode == 0, result.stderr
    assert served(log_path, "train", str(cfg)) == 1
    assert_same_weights(final_weights(tmp_path / "alone" / "run"), final_weights(tmp_path / "through" / "run"))
    assert stats_steps(tmp_path / "alone" / "run") == stats_steps(tmp_path / "through" / "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_client_reaches_the_command(server, tmp_path, sig):
    socket, _ = server
    cfg, run = write_cfg(tmp_path, total_kimg=64.0, checkpoint_kimg=100.0), tmp_path / "run"
    with open(tmp_path / "err", "w") as err:
        client = scm(["train", "--config", str(cfg), "--run-dir", str(run)], tmp_path, socket,
                     stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: stats_steps(run), "a stats line")
        assert read_status(run)["pid"] != client.pid  # the command runs in the server's child
        # past the server's request timeout: a command outlives it (a regression: it once stopped the command)
        time.sleep(forkserver.REQUEST_TIMEOUT_S + 2)
        assert client.poll() is None and read_status(run)["state"] == "running"
        client.send_signal(sig)
        assert client.wait(timeout=300) == 128 + sig  # the command's own status, as without the server
    last = [line for line in (tmp_path / "err").read_text().replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith(f"scm: {signal.Signals(sig).name}: stopped at step ")
    step = read_status(run)["step"]
    assert read_status(run)["state"] == "interrupted" and [s for s, _ in list_checkpoints(run)] == [step]


def test_a_killed_client_stops_its_command_at_a_step_boundary(server, tmp_path):
    socket, _ = server
    cfg, run = write_cfg(tmp_path, total_kimg=64.0, checkpoint_kimg=100.0), tmp_path / "run"
    client = scm(["train", "--config", str(cfg), "--run-dir", str(run)], tmp_path, socket,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: stats_steps(run), "a stats line")
    child = read_status(run)["pid"]
    client.kill()  # SIGKILL: nothing is forwarded; the child sees its client's socket close
    client.wait(timeout=60)
    wait_for(lambda: read_status(run).get("state") == "interrupted", "the command to stop", 300)
    wait_for(lambda: not _alive(child), "the child to exit", 60)
    assert [s for s, _ in list_checkpoints(run)] == [read_status(run)["step"]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie until the server reaps it: exited
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_the_server_declines_what_it_cannot_run_fresh_and_the_command_still_runs(server, tmp_path):
    socket, log_path = server
    before = served(log_path, "info", "sizes")
    args = ["info", "sizes", "--dataset", "shapes"]
    alone = scm(args, tmp_path)
    through = scm(args, tmp_path, socket, env={"PYTORCH_NO_SUCH_SETTING": "1"})  # torch reads these at import
    assert through.returncode == 0 and through.stdout == alone.stdout
    assert "declined (environment differs in PYTORCH_NO_SUCH_SETTING); running here" in through.stderr
    assert served(log_path, "info", "sizes") == before
    # no server at that path: the command runs here, silently
    missing = scm(args, tmp_path, tmp_path / "no.sock")
    assert (missing.returncode, missing.stdout, missing.stderr) == (0, alone.stdout, alone.stderr)


def test_decline_reasons(tmp_path):
    import os as _os

    source = tmp_path / "module.py"
    source.write_text("x = 1\n")
    sources = {str(source): _os.stat(source).st_mtime_ns}
    env = {"PATH": "/bin", "OMP_NUM_THREADS": "1", "TORCH_HOME": "/a"}
    request = {"prefix": sys.prefix, "env": {**env, "PATH": "/usr/bin", "OMP_NUM_THREADS": "2", "TMPDIR": "/t"}}
    assert forkserver.decline_reason(request, sources, env) is None  # per-job variables are applied, not declined
    assert "TORCH_HOME" in forkserver.decline_reason({**request, "env": {**env, "TORCH_HOME": "/b"}}, sources, env)
    assert "is not the server's" in forkserver.decline_reason({**request, "prefix": "/other"}, sources, env)
    time.sleep(0.01)
    source.write_text("x = 2\n")
    _os.utime(source, ns=(sources[str(source)] + 10**9, sources[str(source)] + 10**9))
    assert "changed since the server started" in forkserver.decline_reason(request, sources, env)
    source.unlink()
    assert "is gone" in forkserver.decline_reason(request, sources, env)


def test_variables_the_imports_set_are_not_a_difference():
    server_env = {"PATH": "/bin", "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_me"}  # set by import torch_fidelity
    request = {"prefix": sys.prefix, "env": {"PATH": "/bin"}}
    set_by_import = frozenset({"TORCHINDUCTOR_CACHE_DIR"})
    assert forkserver.decline_reason(request, {}, server_env, set_by_import) is None
    request["env"]["TORCHINDUCTOR_CACHE_DIR"] = "/tmp/torchinductor_me"  # a client that imported the same
    assert forkserver.decline_reason(request, {}, server_env, set_by_import) is None
    request["env"]["TORCHINDUCTOR_CACHE_DIR"] = "/elsewhere"
    assert "TORCHINDUCTOR_CACHE_DIR" in forkserver.decline_reason(request, {}, server_env, set_by_import)


def test_the_server_stops_when_the_process_that_started_it_is_gone(tmp_path):
    path = tmp_path / "orphan.sock"
    # a shell starts the server in the background, waits until it serves, and exits (as a killed `make run`)
    script = (f"{sys.executable} -m scm.cli serve --socket {path} --preload json >{tmp_path / 'log'} 2>&1 & "
              f"pid=$!; while [ ! -S {path} ]; do sleep 0.1; done; echo $pid")
    out = subprocess.run(["sh", "-c", script], env=ENV, capture_output=True, text=True, check=True, timeout=120)
    pid = int(out.stdout.strip())
    wait_for(lambda: not _alive(pid), "the orphaned server to exit", 120)
    assert not path.exists() and "exited" in (tmp_path / "log").read_text()
