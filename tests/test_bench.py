"""Every benchmark runs end to end at test shapes and writes its JSON (speed itself is bench.py's job)."""
import json

import pytest

from instructgpt_jax.bench import __main__ as bench

CASES = {
    "train": ["--size", "test", "--batch", "8", "--seq", "64", "--matmul-n", "256", "--lm-head-chunk", "0,128"],
    "decode": ["--size", "test", "--prompt-len", "8", "--new-tokens", "8", "--batches", "8", "--compare-batch", "8"],
    "ppo": ["--sizes", "test", "--batch", "8", "--minibatch", "8"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_prints_a_table_and_writes_json(name, tmp_path, capsys):
    path = tmp_path / f"{name}.json"
    assert bench.main([name, "--repeats", "1", "--json", str(path), *CASES[name]]) == 0
    written = json.loads(path.read_text())
    assert written["benchmark"] == name
    rows = written["rows"]
    assert rows, written
    assert all(row.get("matmul_gflops_before", 0) > 0 for row in rows if "matmul_gflops_before" in row)
    if name == "train":  # one row per LM-head variant, the chunked one needing less scratch memory
        assert [row["lm_head_chunk"] for row in rows] == [0, 128]
        assert rows[1]["scratch_MB"] < rows[0]["scratch_MB"]
    if name == "ppo":
        assert rows[0]["episodes_per_s"] > 0 and rows[0]["recompilations"] == 0
        assert rows[0]["generate_s"] > 0 and rows[0]["update_s"] > 0
        # the tiny RM's form, its frozen copies holding the reference: the scoring path of the pipeline's PPO
        assert rows[0]["rm_score"] == "final_token+sft_loglik" and rows[0]["reuses_reference"]
    assert name in capsys.readouterr().out


def test_impossible_attention_settings_are_one_error_line(capsys):
    assert bench.main(["train", "--attention", "block_sparse", "--block", "100", "--seq", "512"]) == 2
    assert capsys.readouterr().err.strip() == ("error: model.attention.block_size=100 must divide the sequence "
                                                "length 512 (layers 'dense')")
    with pytest.raises(SystemExit):  # argparse: exit status 2 with its own one-line message
        bench.main(["train", "--attention", "flash"])


def test_train_profile_writes_a_trace(tmp_path):
    assert bench.main(["train", "--repeats", "1", *CASES["train"], "--profile", str(tmp_path / "trace")]) == 0
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))


def test_train_reference_times_the_same_model_in_pytorch(tmp_path):
    pytest.importorskip("torch", reason="the `hf` extra (pip install -e '.[hf]') is not installed")
    path = tmp_path / "train.json"
    args = ["train", "--repeats", "1", "--json", str(path), "--size", "test", "--batch", "2", "--seq", "32",
            "--matmul-n", "256", "--reference", "eager"]
    assert bench.main(args) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [row["framework"].split()[0] for row in rows] == ["jax", "pytorch-eager"]
    assert all(row["step_ms"] > 0 and row["own_utilisation"] > 0 for row in rows)
    assert rows[0]["own_utilisation"] == pytest.approx(rows[0]["utilisation"])


def test_reference_without_torch_is_one_error_line(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert bench.main(["train", *CASES["train"], "--reference", "eager"]) == 2
    assert "needs PyTorch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["train", "--reference", "jit"])


def test_reference_refuses_settings_it_does_not_reproduce(capsys):
    assert bench.main(["train", *CASES["train"], "--remat", "full", "--reference", "eager"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --reference times the same model with dense float32 attention, "
                                                "no dropout and no remat; this run sets model.remat='full'")
