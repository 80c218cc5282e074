"""Running the repository's programs as real subprocesses in tests: each in its own session, so a
timeout kills its whole process group (ranks, loader workers, fork server) and none is left behind."""
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by a launcher: a child must not inherit them


def clean_env(extra=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and k not in drop}
    env.update(extra or {})
    return env


def run_script(argv, timeout=240, env=None, merge_output=False, what=None):
    """`python ARGV...` from the repository root; a script path is taken relative to it.
    Returns the CompletedProcess (stderr None with merge_output); fails the test on timeout."""
    argv = list(argv)
    if argv and argv[0].endswith(".py") and not os.path.isabs(argv[0]):
        argv[0] = os.path.join(ROOT, argv[0])
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=clean_env() if env is None else env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what or ' '.join(argv[:2])} did not finish within {timeout} s:\n{out[-3000:]}\n{(err or '')[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous the test sets up)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
