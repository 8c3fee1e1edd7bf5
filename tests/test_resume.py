"""Preemption: a run killed with SIGKILL and rerun with the same command ends bit-identical to a run
never interrupted (same batches from the restored data iterator, same dropout from fold_in(rng, step)),
for pretraining, SFT (with its epoch selection), the reward model (with its bias) and PPO-ptx (rollouts,
β and the ptx iterator, and the final evaluation)."""
import json
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


def kill_after_checkpoint(cmd, workdir, min_step, proc=None):
    """Starts cmd and SIGKILLs it once a checkpoint >= min_step exists (mid-run, at an arbitrary point)."""
    proc = proc or subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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


def assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(final_params(a)), jax.tree.leaves(final_params(b))
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def straight_and_interrupted(tmp_path, command_for, min_step):
    """Runs the command once straight and once killed after a checkpoint >= min_step and rerun (the two
    side by side); returns the two workdirs."""
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    first = subprocess.Popen(command_for(straight), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    code = kill_after_checkpoint(command_for(interrupted), interrupted, min_step)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    if code == 0:
        pytest.skip("the run finished before it could be killed")
    assert code == -signal.SIGKILL
    out = subprocess.run(command_for(interrupted), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from" in out.stdout
    return straight, interrupted


@pytest.fixture(scope="module")
def later_stages(tmp_path_factory):
    """A tokenizer, an initial model saved as the earlier stage, demonstrations and comparisons built once."""
    from instructgpt_jax.data import sources, tasks
    from instructgpt_jax.models import gpt, heads
    from instructgpt_jax.stages import ppo, rm
    from test_sft import VOCAB, save_initial_model, stage_config, write_tokenizer

    root = tmp_path_factory.mktemp("later_stages")
    tokenizer = write_tokenizer(root / "tokenizer.model")
    c = stage_config("rm", root, tokenizer)
    save_initial_model(c, str(root / "earlier"))
    c.data.demonstrations.path = str(root / "demos.jsonl")
    tasks.write_demonstrations(c.data.demonstrations.path, 96, "train", tasks.Labeler(seed=0), seed=0)
    c.rm.samples, c.rm.num_prompts = "simulated", 128
    c.data.comparisons.path = rm.default_comparisons(c, str(root / "rm"), None, None)
    for kind in ("demonstrations", "comparisons"):  # built before the runs that share the data dir start
        sources.build_jsonl_source(kind, c.data)
    ppo_config = stage_config("ppo", root, tokenizer, "size=test,variant=ppo_ptx")
    ppo_config.ppo.num_prompts = 64
    c.data.prompts.path = ppo.default_prompts(ppo_config)
    sources.build_jsonl_source("prompts", c.data)
    sources.build_text_source("tasks", c.data)  # PPO-ptx's pretraining rows
    reward_model = heads.RewardModel(gpt.GPTConfig.from_config(c.model))
    save_initial_model(c, str(root / "reward"), seed=2, model=reward_model)  # a PPO run scores with it
    heads.write_bias(str(root / "reward"), 0.0, "final_token")
    common = [f"--config.data.dir={c.data.dir}", f"--config.tokenizer.path={tokenizer}",
              f"--config.tokenizer.vocab_size={VOCAB}", f"--config.init.params={root / 'earlier'}",
              f"--config.data.demonstrations.path={c.data.demonstrations.path}",
              f"--config.data.comparisons.path={c.data.comparisons.path}", "--config.data.sources.stdlib.weight=0.0",
              "--config.train.progress_bar=False", "--config.train.async_checkpoints=False",
              "--config.train.log_every=1", "--config.model.resid_dropout=0.1",
              "--config.data.sources.tasks.num_documents=200", "--config.data.sources.tasks.num_validation_documents=20",
              f"--config.data.prompts.path={c.data.prompts.path}"]
    return common, root


def test_resume_sft_is_bit_identical(tmp_path, later_stages):
    later_stages, _ = later_stages

    def command_for(workdir):
        return [sys.executable, "-m", "instructgpt_jax.main", "--config=experiments/sft.py:size=test",
                f"--workdir={workdir}", *later_stages, "--config.sft.epochs=3", "--config.sft.gold_eval_prompts=0"]

    straight, interrupted = straight_and_interrupted(tmp_path, command_for, min_step=1)
    assert_same_params(straight, interrupted)
    selections = [json.loads(open(os.path.join(w, "selection.json")).read()) for w in (straight, interrupted)]
    assert selections[0] == selections[1]


def test_resume_rm_is_bit_identical(tmp_path, later_stages):
    later_stages, _ = later_stages

    def command_for(workdir):
        return [sys.executable, "-m", "instructgpt_jax.main", "--config=experiments/rm.py:size=test",
                f"--workdir={workdir}", *later_stages, "--config.rm.epochs=2", "--config.train.checkpoint_every=5",
                "--config.rm.ceiling_prompts=50"]

    straight, interrupted = straight_and_interrupted(tmp_path, command_for, min_step=5)
    assert_same_params(straight, interrupted)
    biases = [json.loads(open(os.path.join(w, "reward_bias.json")).read()) for w in (straight, interrupted)]
    assert biases[0] == biases[1]


def test_resume_ppo_is_bit_identical(tmp_path, later_stages):
    """PPO-ptx for 3 iterations, a checkpoint after each, killed after the first (policy and reference: the
    initial model, reward and value: a fresh RM)."""
    common, root = later_stages
    stages = [f"--config.init.{key}={root / name}" for key, name in
              (("policy", "earlier"), ("reference", "earlier"), ("reward", "reward"), ("value", "reward"))]
    settings = dict(iterations=3, checkpoint_every=1, batch_size=16, minibatch_size=8, ptx_batch_size=8,
                    eval_prompts=16, eval_lm_batches=1, num_prompts=64, prompt_len=24, max_new_tokens=8)

    def command_for(workdir):
        return [sys.executable, "-m", "instructgpt_jax.main", "--config=experiments/ppo.py:size=test,variant=ppo_ptx",
                f"--workdir={workdir}", *common, *stages, *(f"--config.ppo.{k}={v}" for k, v in settings.items())]

    straight, interrupted = straight_and_interrupted(tmp_path, command_for, min_step=1)
    assert_same_params(straight, interrupted)
    evaluations = [json.loads(open(os.path.join(w, "ppo_eval.json")).read()) for w in (straight, interrupted)]
    assert evaluations[0] == evaluations[1] and evaluations[0]["iterations"] == 3
