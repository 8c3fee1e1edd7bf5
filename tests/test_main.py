"""The command line end to end: train, resume on rerun, clean one-line errors."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(workdir, *overrides, data_dir):
    cmd = [sys.executable, "-m", "instructgpt_jax.main", "--config=experiments/pretrain.py:size=test",
           f"--workdir={workdir}", f"--config.data.dir={data_dir}", "--config.train.progress_bar=False", *overrides]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def test_trains_then_resumes_on_rerun(tmp_path, data_dir):
    workdir = tmp_path / "run"
    first = cli(workdir, "--config.train.steps=6", "--config.train.checkpoint_every=3", data_dir=data_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "parameters" in first.stdout and "resuming" not in first.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["train"]["steps"] == 6
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval"} and all("loss" in r for r in records)
    train = [r for r in records if r["split"] == "train"]
    assert train[0]["compilations"] >= 1 and [r["compilations"] for r in train[1:]] == [0] * (len(train) - 1)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))

    second = cli(workdir, "--config.train.steps=8", "--config.train.checkpoint_every=3", data_dir=data_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {workdir}/checkpoints/6" in second.stdout
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8 and 1 not in steps[steps.index(6) + 1:]  # continued from 6, did not start over


@pytest.mark.parametrize("override,message", [
    ("--config.model.n_heads=3", "model.d_model=64 is not divisible by model.n_heads=3"),
    ("--config.mesh.data=3", "does not fit 1 devices"),
    ("--config.tokenizer.vocab_size=100", "tokenizer.vocab_size=100"),
])
def test_bad_config_is_one_clean_line(tmp_path, data_dir, override, message):
    out = cli(tmp_path / "bad", override, data_dir=data_dir)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
