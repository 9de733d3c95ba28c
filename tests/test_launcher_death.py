"""A killed launcher leaves no worker behind: torchrun starts its workers in sessions of their own, so a kill -9 of the
launcher's process group does not reach them; llama_mp binds each worker's life to its agent's."""

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

WORKER = """
import os, sys, time
import llama_mp.distributed  # binds this worker to its torchrun agent
with open(os.path.join(sys.argv[1], f"worker-{os.environ['LOCAL_RANK']}.pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_workers_end_when_their_launcher_is_killed(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 str(script), str(tmp_path)], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_files = [tmp_path / f"worker-{r}.pid" for r in (0, 1)]
    deadline = time.time() + 60
    while not all(p.exists() and p.read_text() for p in pid_files) and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in pid_files]
    assert all(alive(pid) for pid in pids)
    assert all(os.getsid(pid) == pid for pid in pids)  # torchrun's own doing: each worker leads a session of its own
    os.killpg(launcher.pid, signal.SIGKILL)  # the whole process group of the launcher, as a killed job is
    launcher.wait()
    deadline = time.time() + 10
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their launcher"
