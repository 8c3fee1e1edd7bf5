"""Two local processes joined by jax.distributed (CPU collectives) compute the loss of one process."""
import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n_processes, local_devices, out_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "LOCAL_DEVICES": str(local_devices)}
    if n_processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(n_processes))
    procs = [subprocess.Popen([sys.executable, WORKER, str(out_path)], env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n_processes)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    return json.loads(out_path.read_text())


def test_two_processes_give_the_loss_of_one(tmp_path):
    one = launch(1, 4, tmp_path / "one.json")
    two = launch(2, 2, tmp_path / "two.json")
    assert (one["processes"], two["processes"], two["devices"]) == (1, 2, 4)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
