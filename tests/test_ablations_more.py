"""The SFT-epochs, RM noise/size and few-shot-vs-size ablations: their configs, the pipeline prefixes they run,
SFT's per-epoch gold score, and each ablation's table and plot from a run whose stages are faked (each fake
writes what the real stage writes; the real runs are the tiny ones in runs/ablations)."""
import json
import os
import types

import matplotlib.image
import numpy as np
import pytest

from instructgpt_jax import ablate, configs
from instructgpt_jax.data import tasks
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.stages import pipeline, rm, sft
from instructgpt_jax.train.metrics import MetricWriter

ABLATIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "ablations")


def load(name: str):
    return ablate.load_ablation(os.path.join(ABLATIONS, f"{name}.py"))


def at_test_size(module, monkeypatch, **rm_overrides):
    """The ablation's variants at size=test (and cheaper RM ceilings)."""
    monkeypatch.setattr(module, "VARIANTS", {k: f"{v},size=test" for k, v in module.VARIANTS.items()})
    get_config = module.get_config

    def config(arg):
        c = get_config(arg)
        c.stages.rm.rm.update(rm_overrides)
        return c
    monkeypatch.setattr(module, "get_config", config)


# ------------------------------------------------------------------------------ configs


def test_sft_epochs_config_shares_pretraining_and_scores_epochs_with_the_shared_rm(tmp_path):
    m = load("sft_epochs")
    provider = m.get_config(m.VARIANTS["pipeline_rm"] + ",size=test")
    assert provider.run == ("pretrain", "sft", "rm") and all(provider.shared_stages[s] for s in provider.run)
    c = m.get_config("size=test,epochs=5")
    assert c.run == ("pretrain", "sft") and c.shared_stages.pretrain and not c.shared_stages.sft
    s = c.stages.sft.sft
    assert s.epochs == 5 and s.gold_eval_prompts > 0 and c.stages.sft.labeler.num_demonstrations == 3000
    variant = tmp_path / "sft_8_epochs"
    assert sft.resolve_stage_path(s.select_reward, str(variant / "sft")) == sft.resolve_stage_path(
        provider.shared_stages.rm, str(variant))  # the RM the provider variant trains
    assert c.evaluation.prompts == c.evaluation.few_shot_prompts == 0
    with pytest.raises(ConfigError, match="part="):
        m.get_config("part=ppo")


def test_rm_noise_size_config_sets_the_rankings_noise_and_one_trunk_size_throughout():
    m = load("rm_noise_size")
    c = m.get_config("size=test,noise=0.6")
    assert c.stages.rm.labeler.noise == 0.6 and c.stages.sft.labeler.noise == tasks.LABELER_NOISE
    assert c.stages.rm.rm.samples == "simulated" and c.run == ("pretrain", "sft", "rm")
    assert c.shared_stages.pretrain.endswith("/shared/pretrain") and not c.shared_stages.rm
    narrow = m.get_config("size=test,model=narrow")
    models = [s.model for s in narrow.stages.values()] + [narrow.stages[p].reward_model for p in ("ppo", "ppo_ptx")]
    assert {(x.n_layers, x.d_model, x.n_heads, x.d_ff) for x in models} == {(1, 32, 2, 128)}
    assert narrow.shared_stages.sft.endswith("/shared_narrow/sft")
    import pipeline_ablation as common

    assert common.parameters(narrow) < common.parameters(c)
    with pytest.raises(ConfigError, match="labeler.noise"):
        m.get_config("noise=-0.1")
    with pytest.raises(ConfigError, match="model='huge'"):
        m.get_config("model=huge")


def test_few_shot_size_config_runs_only_pretraining_and_the_k_shot_evaluation():
    m = load("few_shot_size")
    c = m.get_config("size=test,model=deep")
    assert c.run == ("pretrain",) and c.evaluation.prompts == 0
    assert c.evaluation.few_shot_prompts == 512 and tuple(c.evaluation.few_shot_ks) == (0, 1, 3)
    assert c.stages.pretrain.model.n_layers == c.stages.ppo_ptx.model.n_layers == 4  # evaluated with its own shape
    pipeline.validate_run(c)
    with pytest.raises(ConfigError, match="prompts=0"):
        m.get_config("prompts=0")


def test_pipeline_prefixes_need_what_each_stage_starts_from():
    c = configs.experiment_config("pipeline", "size=test")
    c.run = ("pretrain", "rm")
    with pytest.raises(ConfigError, match=r"run=\('pretrain', 'rm'\)"):
        pipeline.validate_run(c)
    c.run = ("pretrain", "sft")
    with pytest.raises(ConfigError, match="evaluation.prompts=32"):  # the comparison needs SFT and the RM
        pipeline.validate_run(c)
    c.evaluation.prompts = 0
    pipeline.validate_run(c)


# ------------------------------------------------------------------------------ SFT's per-epoch gold score


def test_sft_records_each_epochs_gold_score_without_selecting_by_it(monkeypatch, tmp_path):
    c = configs.experiment_config("sft", "size=test")
    c.sft.gold_eval_prompts = 6
    prompts = tasks.sample_prompts(6, "validation", c.seed)
    solved = set(prompts[:3])

    def sample_texts(sampler, params, tokenizer, ids, rng, temperature, config):  # params: how many it solves
        assert len(ids) == len(prompts)
        return [tasks.reference_answer(p) if p in solved and i < params else "zz" for i, p in enumerate(prompts)], \
            [True] * len(prompts)
    monkeypatch.setattr(sft, "sample_texts", sample_texts)
    tokenizer = types.SimpleNamespace(encode=lambda text: [len(text)])
    built = types.SimpleNamespace(split=lambda name: [None] * 16)
    criteria = sft.selection_criteria(c, str(tmp_path), None, None, tokenizer, built, None, None, sampler=None)
    assert set(criteria) == {"validation_loss", "gold"}
    assert criteria["gold"](3) == pytest.approx(0.5) and criteria["gold"](1) == pytest.approx(1 / 6)
    gold = sft.gold_evaluation(c, None, tokenizer, {"pretrained": 0, "sft": 3})  # the same scores, with CIs
    assert gold["sft_greedy"]["mean"] == pytest.approx(0.5) and gold["pretrained_greedy"]["mean"] == 0.0

    class Checkpointer:  # epoch e's params = e
        manager = types.SimpleNamespace(all_steps=lambda: [], delete=None)

        def restore(self, abstract, step):
            return types.SimpleNamespace(params=step // 10), None

        def save(self, step, state):
            self.saved = step

        def wait(self):
            pass

    c.sft.epochs = 3
    loss = {1: 2.0, 2: 1.0, 3: 1.5}
    selection = sft.select_epoch(c, Checkpointer(), None, 10, {"validation_loss": loss.get, "gold": criteria["gold"]})
    assert [e["gold"] for e in selection["epochs"]] == pytest.approx([1 / 6, 2 / 6, 0.5])
    assert selection["by"] == "validation_loss" and selection["selected_epoch"] == 2


# ------------------------------------------------------------------------------ tables and plots from fake runs


def write_metrics(workdir, stage, split="eval", **metrics):
    writer = MetricWriter(workdir, stage, console=None)
    writer.write(1, {"loss": 3.0}, "train")
    writer.write(2, {"loss": 2.5, **metrics}, split)
    writer.close()


def fake_pretrain(config, workdir):
    write_metrics(workdir, "pretrain", loss=4.0 / config.model.n_layers)


def fake_sft(config, workdir):
    """What sft.run leaves: selection.json from select_epoch over criteria like selection_criteria's (epoch e's
    params = e): validation loss best at epoch 2, RM score and gold rising."""
    s = config.sft
    if s.select_reward:  # sft.run loads it first
        assert os.path.isfile(os.path.join(sft.resolve_stage_path(s.select_reward, workdir), rm.EVAL_FILE))
    criteria = {"validation_loss": lambda e: (e - 2) ** 2 + 1.0}
    if s.select_reward:
        criteria["reward"] = lambda e: 0.1 * e - 0.5
    if s.gold_eval_prompts:
        criteria["gold"] = lambda e: 0.3 + 0.02 * e
    checkpointer = types.SimpleNamespace(restore=lambda abstract, step: (types.SimpleNamespace(params=step), None),
                                         manager=types.SimpleNamespace(all_steps=lambda: []),
                                         save=lambda step, state: None, wait=lambda: None)
    common_json(workdir, sft.SELECTION_FILE, sft.select_epoch(config, checkpointer, None, 1, criteria))
    write_metrics(workdir, "sft", loss=1.0)


def fake_rm(config, workdir):
    noise, width = config.labeler.noise, config.model.d_model
    common_json(workdir, rm.EVAL_FILE, {"prompts": 20, "pairs": 100, "accuracy": 0.7 - 0.3 * noise - 1.0 / width,
                                        "gold_pairs": 60, "gold_agreement": 0.65 - 0.1 * noise,
                                        "labels_gold_agreement": 0.8 - 0.2 * noise, "labeler_agreement_ceiling": 0.73})
    write_metrics(workdir, "rm", loss=0.6)


def common_json(workdir, name, obj):
    with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        json.dump(obj, f)


@pytest.fixture
def fake_stages(monkeypatch):
    """stages.run: the real pipeline over fake stages; returns the (stage, workdir) list of stages run."""
    ran, fakes, real = [], {"pretrain": fake_pretrain, "sft": fake_sft, "rm": fake_rm}, pipeline.run

    def run(config, workdir):
        if config.stage == "pipeline":
            return real(config, workdir)
        os.makedirs(workdir, exist_ok=True)
        ran.append((config.stage, os.path.relpath(os.path.realpath(workdir))))
        fakes[config.stage](config, workdir)
    monkeypatch.setattr("instructgpt_jax.stages.run", run)
    monkeypatch.setattr(pipeline, "evaluate", lambda config, workdir: pytest.fail("evaluated with nothing to do"))
    return ran


def check_outputs(workdir, module, n_rows):
    rows = json.loads((workdir / "results.json").read_text())
    table = (workdir / "results.md").read_text().splitlines()
    assert table[2].startswith("| " + " | ".join(module.COLUMNS) + " |") and len(table) == 4 + n_rows
    image = matplotlib.image.imread(workdir / "results.png")
    assert image.shape[0] > 200 and image.std() > 0.01  # drawn, not blank
    return rows


def test_sft_epochs_table_has_a_row_per_epoch(fake_stages, tmp_path, monkeypatch):
    m = load("sft_epochs")
    at_test_size(m, monkeypatch)
    monkeypatch.chdir(tmp_path)
    ablate.run_ablation(m, "abl")
    rows = check_outputs(tmp_path / "abl", m, 8 + 16)
    assert fake_stages == [("pretrain", "abl/shared/pretrain"), ("sft", "abl/shared/sft"), ("rm", "abl/shared/rm"),
                           ("sft", "abl/sft_8_epochs/sft"), ("sft", "abl/sft_16_epochs/sft")]
    assert [(r["variant"], r["epoch"]) for r in rows] == [("sft_8_epochs", e) for e in range(1, 9)] + [
        ("sft_16_epochs", e) for e in range(1, 17)]
    rows = rows[:8]
    assert [r["validation_loss"] for r in rows[:3]] == [2.0, 1.0, 2.0]
    assert rows[-1]["rm_score"] == pytest.approx(0.3) and rows[-1]["gold"] == pytest.approx(0.46)
    assert [r["selected"] for r in rows] == [False] * 7 + [True]  # by RM score, as InstructGPT
    fake_stages.clear()
    ablate.run_ablation(m, "abl")  # a rerun only tabulates
    assert fake_stages == []


def test_rm_noise_size_table_has_accuracy_next_to_the_ceiling_at_each_noise(fake_stages, tmp_path, monkeypatch):
    m = load("rm_noise_size")
    at_test_size(m, monkeypatch, ceiling_prompts=200)
    monkeypatch.chdir(tmp_path)
    ablate.run_ablation(m, "abl")
    rows = {r["variant"]: r for r in check_outputs(tmp_path / "abl", m, 5)}
    pretrained = [w for stage, w in fake_stages if stage == "pretrain"]
    assert pretrained == [f"abl/shared{t}/pretrain" for t in ("", "_narrow", "_deep")]  # once per trunk
    assert [w for stage, w in fake_stages if stage == "rm"] == [f"abl/{v}/rm" for v in m.VARIANTS]  # one each
    assert rows["noise_0"]["ceiling"] == 1.0 > rows["noise_0.32"]["ceiling"] > rows["noise_0.6"]["ceiling"] > 0.5
    assert rows["noise_0.6"]["accuracy"] == pytest.approx(0.7 - 0.18 - 1 / 64)
    assert rows["narrow_noise_0.32"]["model"] == "narrow"
    assert rows["narrow_noise_0.32"]["params"] < rows["noise_0"]["params"] < rows["deep_noise_0.32"]["params"]


def test_few_shot_size_table_has_accuracy_per_k_and_size(fake_stages, tmp_path, monkeypatch):
    m = load("few_shot_size")
    at_test_size(m, monkeypatch)
    evaluated = []

    def evaluate(config, workdir):  # pipeline.evaluate's results with only the pretrained policy, k-shot only
        evaluated.append(tuple(config.run))
        depth = config.stages.ppo_ptx.model.n_layers
        shots = {f"{k}_shot": {"mean": 0.1 * depth + 0.01 * k, "ci95": 0.02, "k": k, "mean_k": k * 0.9} for k in m.KS}
        return {"pretrained": {"few_shot": {"prompts": 4, **shots}}}, []
    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    monkeypatch.chdir(tmp_path)
    ablate.run_ablation(m, "abl")
    rows = {r["variant"]: r for r in check_outputs(tmp_path / "abl", m, 3)}
    assert [s for s, _ in fake_stages] == ["pretrain"] * 3 and evaluated == [("pretrain",)] * 3
    assert rows["deep"]["3_shot"] == pytest.approx(0.43) and rows["narrow"]["0_shot"] == pytest.approx(0.1)
    assert rows["deep"]["lm_loss"] == 1.0 and rows["deep"]["3_shot_mean_k"] == pytest.approx(2.7)
    assert rows["deep"]["ci95"] == 0.02
    assert rows["narrow"]["params"] < rows["base"]["params"] < rows["deep"]["params"]
    results = (tmp_path / "abl" / "deep" / "results.md").read_text()
    assert "| pretrained | – | – | – | – | – | – | 0.400 | 0.410 | 0.430 |" in results


def test_pipeline_without_evaluations_writes_its_results_and_no_plots_of_shared_stages(fake_stages, tmp_path):
    c = configs.experiment_config("pipeline", "size=test")
    c.run, c.evaluation.prompts, c.evaluation.few_shot_prompts = ("pretrain",), 0, 0
    c.shared_stages.pretrain = "{workdir}/../shared/pretrain"
    assert pipeline.run(c, str(tmp_path / "v")) == {}
    saved = json.loads((tmp_path / "v" / pipeline.RESULTS_JSON).read_text())
    assert saved["policies"] == {} and set(saved["stage_seconds"]) == {"pretrain"}
    assert not (tmp_path / "v" / "plots").exists()
    assert np.isfinite(saved["stage_seconds"]["pretrain"])
