"""Preemption: a run killed with SIGKILL and rerun with the same command ends bit-identical to a run
never interrupted (same batches from the restored data iterator, same dropout from fold_in(rng, step))."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir, data_dir, steps):
    return [sys.executable, "-m", "instructgpt_jax.main", "--config=experiments/pretrain.py:size=test",
            f"--workdir={workdir}", f"--config.data.dir={data_dir}", f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=3", "--config.train.log_every=1", "--config.train.progress_bar=False",
            "--config.model.resid_dropout=0.1", "--config.train.async_checkpoints=False"]


ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def final_params(workdir):
    path = os.path.join(workdir, "checkpoints")
    manager = ocp.CheckpointManager(path, item_names=("state", "data"))
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored.state["params"]


def kill_after_checkpoint(cmd, workdir, min_step):
    """Starts cmd and SIGKILLs it once a checkpoint >= min_step exists (mid-run, at an arbitrary point)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    ckpt = os.path.join(workdir, "checkpoints")
    while time.time() < deadline and proc.poll() is None:
        done = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
        if done and max(done) >= min_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    return proc.returncode


def test_resume_pretrain_is_bit_identical(tmp_path):
    data_dir = str(tmp_path / "data")
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    out = subprocess.run(command(straight, data_dir, 12), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    code = kill_after_checkpoint(command(interrupted, data_dir, 12), interrupted, min_step=3)
    if code == 0:
        pytest.skip("the run finished before it could be killed")
    assert code == -signal.SIGKILL
    out = subprocess.run(command(interrupted, data_dir, 12), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from" in out.stdout
    leaves_a, leaves_b = jax.tree.leaves(final_params(straight)), jax.tree.leaves(final_params(interrupted))
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
