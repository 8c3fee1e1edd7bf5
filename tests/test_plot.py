"""plot: PNGs from metrics.jsonl files (as train/metrics.py writes them) and ablation results."""
import json
import math
import os

import matplotlib.image
import pytest

from instructgpt_jax import plot
from instructgpt_jax.errors import DataError
from instructgpt_jax.train.metrics import MetricWriter


def write_stage(workdir, stage, rows):
    writer = MetricWriter(str(workdir), stage, console=None)
    for split, step, metrics in rows:
        writer.write(step, metrics, split)
    writer.close()


@pytest.fixture()
def pipeline_dir(tmp_path):
    write_stage(tmp_path / "pretrain", "pretrain",
                [("train", s, {"loss": 5.0 / s, "lr": 1e-3}) for s in range(1, 21)]
                + [("eval", s, {"loss": 6.0 / s}) for s in (10, 20)])
    write_stage(tmp_path / "ppo", "ppo",
                [("train", s, {"rm_score": 0.1 * s, "kl": 0.02 * s * s, "gold_score": 0.5 + 0.01 * s,
                               "loss": 1.0, "histogram": [1.0, 2.0]}) for s in range(1, 11)])
    ablation = tmp_path / "sparse_vs_dense"
    ablation.mkdir()
    rows = [{"variant": name, "attention": name, "final_eval_loss": 2.0, "tokens_per_s": speed, "wall_s": 1.0,
             "curve": [[s, 3.0 - 0.1 * s] for s in range(1, 6)], "eval_curve": [[5, 2.5 + offset]]}
            for name, speed, offset in (("dense", 1000.0, 0.0), ("fixed", 1500.0, 0.1))]
    (ablation / "results.json").write_text(json.dumps(rows))
    return tmp_path


def test_every_stage_writer_leaves_tensorboard_events_and_jsonl(pipeline_dir):
    for stage in ("pretrain", "ppo"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(pipeline_dir / stage / "tensorboard"))
        records = plot.read_metrics(str(pipeline_dir / stage / "metrics.jsonl"))
        assert records[0]["stage"] == stage and records[0]["split"] == "train"


def test_pipeline_workdir_gets_curves_reward_vs_kl_and_sparse_vs_dense(pipeline_dir):
    written = plot.plot_workdir(str(pipeline_dir))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["ppo_curves.png", "ppo_reward_vs_kl.png", "pretrain_curves.png",
                     "sparse_vs_dense_sparse_vs_dense.png"]
    for path in written:
        assert os.path.dirname(path) == str(pipeline_dir / "plots")
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.01  # not blank


def test_stage_workdir_and_explicit_results(pipeline_dir, tmp_path):
    out = tmp_path / "elsewhere"
    results = str(pipeline_dir / "sparse_vs_dense" / "results.json")
    written = plot.plot_workdir(str(pipeline_dir / "pretrain"), str(out), results=results)
    assert sorted(os.path.basename(p) for p in written) == ["pretrain_curves.png", "sparse_vs_dense_sparse_vs_dense.png"]
    assert plot.main([str(pipeline_dir / "ppo"), f"--out={out}"]) == 0
    assert (out / "ppo_reward_vs_kl.png").is_file()


def test_scalar_series_groups_splits_and_skips_what_cannot_be_plotted():
    records = [{"stage": "x", "split": "train", "step": 1, "time": 9.0, "loss": 2.0, "nonfinite": True,
                "bad": math.nan, "hist": [1, 2]},
               {"stage": "x", "split": "eval", "step": 1, "loss": 3.0},
               {"stage": "x", "split": "train", "step": 2, "loss": 1.0}]
    assert plot.scalar_series(records) == {"loss": {"train": ([1, 2], [2.0, 1.0]), "eval": ([1], [3.0])}}


def test_bad_inputs_are_one_clear_error(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{oops\n')
    with pytest.raises(DataError, match="metrics.jsonl:2"):
        plot.plot_workdir(str(tmp_path))
    (tmp_path / "results.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="not an ablation results.json"):
        plot.read_results(str(tmp_path / "results.json"))
    assert plot.main([str(tmp_path), "--colour=red"]) == 2
