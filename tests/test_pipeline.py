"""The pipeline's orchestration: which stages run, shared stage directories, the results table."""
import json
import os

import pytest

from instructgpt_jax import configs
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.stages import pipeline


@pytest.fixture
def config():
    return configs.experiment_config("pipeline", "size=test")


def fake_stage(ran):
    def run(cfg, workdir):  # what a stage leaves behind, minus the training
        os.makedirs(workdir, exist_ok=True)
        ran.append(os.path.basename(workdir))
    return run


def test_finished_stages_are_skipped_and_the_rest_run_in_order(config, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr("instructgpt_jax.stages.run", fake_stage(ran))
    os.makedirs(tmp_path / "pretrain")
    (tmp_path / "pretrain" / pipeline.DONE_FILE).write_text(json.dumps({"seconds": 12.0}))
    seconds = pipeline.run_stages(config, str(tmp_path))
    assert ran == ["sft", "rm", "ppo", "ppo_ptx"]
    assert seconds["pretrain"] == 12.0 and set(seconds) == set(pipeline.ORDER)
    assert all((tmp_path / name / pipeline.DONE_FILE).is_file() for name in pipeline.ORDER)
    ran.clear()
    pipeline.run_stages(config, str(tmp_path))
    assert ran == []  # a rerun skips everything


def test_shared_stages_are_links_to_one_directory(config, tmp_path, monkeypatch):
    monkeypatch.setattr("instructgpt_jax.stages.run", fake_stage([]))
    config.run = ("pretrain", "sft", "rm", "ppo")
    for name in ("pretrain", "sft", "rm"):
        config.shared_stages[name] = "{workdir}/../shared/" + name
    for variant in ("a", "b"):
        pipeline.run_stages(config, str(tmp_path / variant))
    assert os.path.realpath(tmp_path / "a" / "sft") == os.path.realpath(tmp_path / "b" / "sft") == str(tmp_path / "shared" / "sft")
    assert not os.path.islink(tmp_path / "a" / "ppo") and not (tmp_path / "a" / "ppo_ptx").exists()
    config.shared_stages.sft = "{workdir}/../elsewhere/sft"
    with pytest.raises(ConfigError, match="shared_stages.sft"):
        pipeline.run_stages(config, str(tmp_path / "a"))


def test_a_run_without_the_reward_model_is_refused(config, tmp_path):
    config.run = ("pretrain", "sft", "ppo")
    with pytest.raises(ConfigError, match="run="):
        pipeline.run_stages(config, str(tmp_path))


def row(gold, kl, few_shot=True, vs_sft=None):
    sampled = {"gold": {"mean": gold, "ci95": 0.01}, "rm_score": {"mean": 0.1, "ci95": 0.02},
               "kl_to_reference": {"mean": kl, "ci95": 0.0}}
    if vs_sft is not None:
        sampled["vs_sft"] = {"gold": {"win_rate": vs_sft, "ci_low": vs_sft - 0.02, "ci_high": vs_sft + 0.02}}
    out = {"sampled": sampled, "greedy": {"gold": {"mean": gold + 0.1, "ci95": 0.01}}, "pretrain_loss": 3.0}
    if few_shot:
        out["few_shot"] = {"0_shot": {"mean": 0.2}, "1_shot": {"mean": 0.3}}
    return out


def test_results_table_has_a_row_per_policy_with_sft_as_the_baseline():
    results = {"sft": row(0.5, 0.0), "ppo": row(0.6, 1.5, vs_sft=0.61), "pretrained": row(0.1, 7.0, few_shot=False,
                                                                                           vs_sft=0.2)}
    table = pipeline.results_table(results, ks=(0, 1)).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| pretrained", "| sft", "| ppo"]  # POLICIES order
    assert "(baseline)" in table[3] and "0.610 [0.590, 0.630]" in table[4]
    assert table[4].endswith("| 0.200 | 0.300 |") and table[2].endswith("| – | – |")
