"""Evaluators on hand-made inputs with known answers."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructgpt_jax import configs
from instructgpt_jax.data import tasks, tokenizer as tokenizer_lib
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.eval import best_of_n, few_shot, gold, perplexity, rm_accuracy, samples, stats
from instructgpt_jax.models import gpt
from instructgpt_jax.rl import sampling
from instructgpt_jax.train import sharding


@pytest.fixture(scope="module")
def byte_tokenizer():
    """GPT-2's byte-level tokenizer with no merges: one token per byte, <|endoftext|> = 256."""
    vocab = {c: i for i, c in enumerate(tokenizer_lib.bytes_to_unicode().values())}
    return tokenizer_lib.ByteLevelBPETokenizer({**vocab, tokenizer_lib.GPT2_EOS_TOKEN: 256}, [])


# ------------------------------------------------------------------------------ stats


def test_mean_ci_is_the_normal_half_width():
    result = stats.mean_ci([0.0, 1.0, 2.0, 3.0])
    assert result["mean"] == 1.5
    assert result["ci95"] == pytest.approx(1.96 * np.std([0, 1, 2, 3], ddof=1) / 2)


def test_bootstrap_interval_covers_the_mean_with_the_expected_width():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    low, high = stats.bootstrap_ci(values, seed=1)
    assert low < 3.0 < high
    assert high - low == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(400), rel=0.15)
    assert stats.bootstrap_ci(np.full(10, 0.25)) == (0.25, 0.25)


def test_win_rate_counts_ties_as_half():
    result = stats.win_rate([1.0, 0.0, 0.5, 0.9], [0.0, 1.0, 0.5, 0.2])
    assert result["win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (2, 1, 1, 4)
    assert result["ci_low"] <= result["win_rate"] <= result["ci_high"]
    assert stats.win_rate([0.30], [0.25], tie_tolerance=0.1)["ties"] == 1


def test_identical_policies_win_half_the_time_within_the_interval():
    rng = np.random.default_rng(0)
    same = rng.random(200)
    assert stats.win_rate(same, same)["win_rate"] == 0.5
    # Two independent samples of one policy's scores: 0.5 must lie inside the bootstrap interval.
    draws = lambda: rng.choice([0.0, 0.25, 0.5, 1.0], size=300, p=[0.3, 0.2, 0.1, 0.4])  # noqa: E731
    result = stats.win_rate(draws(), draws(), seed=3)
    assert result["ci_low"] < 0.5 < result["ci_high"] and result["ci_high"] - result["ci_low"] < 0.15
    better = stats.win_rate(draws() + 2.0, draws(), seed=3)
    assert better["win_rate"] == 1.0 and better["ci_low"] == 1.0


def test_paired_difference_and_compare():
    diff = stats.paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 2.0, 2.0])
    assert diff["mean"] == pytest.approx(1.0) and diff["ci_low"] <= 1.0 <= diff["ci_high"]
    result = stats.compare([1.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    assert result["policy"]["mean"] == pytest.approx(2 / 3) and result["win_rate"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equal-length"):
        stats.compare([1.0, 2.0], [1.0, 2.0, 3.0])


# ------------------------------------------------------------------------------ gold, RM judge


def test_gold_comparison_of_correct_against_wrong_answers():
    prompts = tasks.sample_prompts(40, "validation", seed=0)
    right = [tasks.COMPLETION_PREFIX + tasks.reference_answer(p) for p in prompts]
    wrong = [" zzz"] * len(prompts)
    ended = [True] * len(prompts)
    rm_right, rm_wrong = np.linspace(1, 2, 40), np.linspace(0, 1, 40) - 0.5
    result = gold.policy_vs_baseline(prompts, (right, ended), (wrong, ended),
                                     policy_rm_scores=rm_right, baseline_rm_scores=rm_wrong)
    assert result["gold"]["policy"]["mean"] == 1.0 and result["gold"]["baseline"]["mean"] == 0.0
    assert result["gold"]["win_rate"] == 1.0 and result["rm"]["win_rate"] == 1.0
    assert result["gold"]["difference"]["mean"] == 1.0
    same = gold.policy_vs_baseline(prompts, (right, ended), (right, [False] * 40))
    assert same["gold"]["win_rate"] == 1.0 and same["gold"]["baseline"]["mean"] == tasks.UNENDED_CREDIT
    assert gold.policy_vs_baseline(prompts, (wrong, ended), (wrong, ended))["gold"]["win_rate"] == 0.5
    with pytest.raises(ValueError, match="both"):
        gold.policy_vs_baseline(prompts, (right, ended), (wrong, ended), policy_rm_scores=rm_right)


def test_mean_by_family_averages_each_family_separately():
    prompts = tasks.sample_prompts(60, "validation", seed=0)
    scores = [float(tasks.task_family(p) == "sort") for p in prompts]
    by_family = gold.mean_by_family(prompts, scores)
    assert by_family["sort"] == 1.0 and all(v == 0.0 for f, v in by_family.items() if f != "sort")
    assert list(by_family) == [f for f in tasks.FAMILIES if f in by_family]


# ------------------------------------------------------------------------------ RM accuracy


def test_ranked_accuracy_counts_pairs_in_rank_order():
    responses = [["a", "b", "c"], ["x", "y"]]
    assert rm_accuracy.ranked_accuracy([[3, 2, 1], [5, 0]], responses)["accuracy"] == 1.0
    assert rm_accuracy.ranked_accuracy([[1, 2, 3], [0, 5]], responses)["accuracy"] == 0.0
    mixed = rm_accuracy.ranked_accuracy([[3, 1, 2], [0, 5]], responses)
    assert mixed["accuracy"] == pytest.approx(2 / 4) and mixed["pairs"] == 4
    assert mixed["ci_low"] <= 0.5 <= mixed["ci_high"]
    # Identical strings are not a comparison.
    assert rm_accuracy.ranked_accuracy([[1, 2]], [["same", "same"]])["pairs"] == 0


def test_rm_scores_of_texts_end_with_eos_only_when_ended(byte_tokenizer):
    def last_token(params, tokens, last, first):  # a "reward model" that returns the token it reads
        return np.asarray(tokens)[np.arange(len(last)), np.asarray(last)].astype(np.float32)

    scores = rm_accuracy.score_texts(last_token, None, byte_tokenizer, ["Q:", "Q:"], [" ab", " ab"], [True, False], 16)
    np.testing.assert_array_equal(scores, [byte_tokenizer.eos_id, byte_tokenizer.encode("b")[0]])


# ------------------------------------------------------------------------------ perplexity


def test_sequence_nll_on_hand_made_logits():
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p(1) = 0.75, then uniform
    nll, count = perplexity.sequence_nll(logits, jnp.array([[1, 0]]), jnp.array([[1.0, 1.0]]))
    assert float(count) == 2 and float(nll) == pytest.approx(-math.log(0.75) + math.log(2.0), rel=1e-6)
    nll, count = perplexity.sequence_nll(logits, jnp.array([[1, 0]]), jnp.array([[1.0, 0.0]]))
    assert float(count) == 1 and float(nll) == pytest.approx(-math.log(0.75), rel=1e-6)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model_cfg = configs.model_config("test")
    model_cfg.vocab_size = 300  # padded to 384: the padded rows must not count
    cfg = gpt.GPTConfig.from_config(model_cfg)
    model = gpt.GPT(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes))  # every logit 0: uniform
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 300, (4, 17))} for _ in range(3)]
    nll_fn = perplexity.make_nll_fn(model)
    result = perplexity.heldout_perplexity(nll_fn, params, batches)
    assert result["perplexity"] == pytest.approx(300, rel=1e-4) and result["tokens"] == 3 * 4 * 16
    masked = [{**b, "loss_mask": np.tril(np.ones((4, 16), np.float32))} for b in batches]
    result = perplexity.heldout_perplexity(nll_fn, params, masked, max_batches=2)
    assert result["perplexity"] == pytest.approx(300, rel=1e-4) and result["tokens"] == 2 * (1 + 2 + 3 + 4)


# ------------------------------------------------------------------------------ few-shot


def generation_config(batch_size=4):
    return ml_collections.ConfigDict(dict(generation=dict(batch_size=batch_size, top_p=1.0)))


def oracle_sampler(tokenizer, continuation=""):
    """A sampler stand-in that answers each (few-shot) prompt correctly, then says `continuation`."""
    def sample(params, tokens, mask, rng, temperature, top_p):
        rows = []
        for row, valid in zip(np.asarray(tokens), np.asarray(mask)):
            prompt = tokenizer.decode(row[valid])
            rows.append(tokenizer.encode(f" {tasks.reference_answer(prompt)}{continuation}")[:24])
        response = np.full((len(rows), 24), tokenizer.eos_id, np.int32)
        for i, ids in enumerate(rows):
            response[i, :len(ids)] = ids
        return sampling.SampleOutput(tokens=None, response=response, response_mask=None, logprobs=None,
                                     ended=np.array([not continuation] * len(rows)), lengths=None)
    return sample


def test_few_shot_prompts_fit_the_context_with_as_many_examples_as_fit(byte_tokenizer):
    prompt = tasks.sample_prompts(1, "test", seed=0)[0]
    ids, shots = few_shot.fitted_prompt_ids(byte_tokenizer, prompt, 3, seed=0, max_prompt_tokens=10_000)
    assert shots == 3 and byte_tokenizer.decode(ids).count(tasks.ANSWER_MARKER) == 4
    zero = len(byte_tokenizer.encode(tasks.few_shot_prompt(prompt, 0, seed=0)))
    ids, shots = few_shot.fitted_prompt_ids(byte_tokenizer, prompt, 3, seed=0, max_prompt_tokens=zero)
    assert shots == 0 and len(ids) == zero
    with pytest.raises(ConfigError, match="max_new_tokens"):
        few_shot.fitted_prompt_ids(byte_tokenizer, prompt, 3, seed=0, max_prompt_tokens=zero - 1)


def test_few_shot_evaluation_scores_an_oracle_perfectly_and_stops_at_newline(byte_tokenizer):
    prompts = tasks.sample_prompts(6, "test", seed=1)
    config = generation_config()
    result = few_shot.few_shot_evaluation(oracle_sampler(byte_tokenizer, "\n\nRepeat: junk"), None, byte_tokenizer,
                                          prompts, (0, 1, 2), config, max_prompt_tokens=10_000)
    for k in (0, 1, 2):
        row = result[f"{k}_shot"]
        assert row["mean"] == 1.0 and row["exact"] == 1.0 and row["ended"] == 1.0 and row["mean_k"] == k
    assert few_shot.cut_at_stop(" a b\nc", False) == (" a b", True)
    assert few_shot.cut_at_stop(" a b", False) == (" a b", False)


def test_few_shot_evaluation_runs_the_kv_cache_sampler(byte_tokenizer):
    model_cfg = configs.model_config("test")
    model_cfg.update(vocab_size=257, max_len=256, n_layers=1, d_model=32, n_heads=2, d_head=16, d_ff=64)
    config = configs.base_config("sft", "test")
    config.model = model_cfg
    config.generation = generation_config(batch_size=8).generation
    model = gpt.GPT(gpt.GPTConfig.from_config(model_cfg))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    sampler = sampling.make_sampler(config, model, sharding.make_mesh(config), max_new_tokens=8,
                                    eos_id=byte_tokenizer.eos_id, pad_id=byte_tokenizer.pad_id)
    prompts = tasks.sample_prompts(4, "test", seed=2)
    result = few_shot.few_shot_evaluation(sampler, params, byte_tokenizer, prompts, (2,), config,
                                          max_prompt_tokens=model_cfg.max_len - 8)
    assert 0 < result["2_shot"]["mean_k"] <= 2 and 0.0 <= result["2_shot"]["mean"] <= 1.0
    assert len(result["2_shot"]["examples"]) == 3
    again = few_shot.few_shot_evaluation(sampler, params, byte_tokenizer, prompts, (2,), config,
                                         max_prompt_tokens=model_cfg.max_len - 8)
    assert again["2_shot"] == result["2_shot"]  # greedy and seeded: the same prompts and answers


# ------------------------------------------------------------------------------ sample tables


def test_sample_table_keeps_each_sample_on_its_row(tmp_path):
    table = samples.sample_table(["Repeat: a|b\nAnswer:", "Q2"], {"sft": [" a|b", ""], "ppo": [" x\ny", " z"]},
                                 {"gold": [1.0, 0.123456]})
    lines = table.splitlines()
    assert lines[0] == "| # | prompt | sft | ppo | gold |" and len(lines) == 4
    assert lines[2] == "| 1 | Repeat: a\\|b⏎Answer: |  a\\|b |  x⏎y | 1 |"
    assert lines[3].endswith("| 0.1235 |")
    samples.write_sample_table(str(tmp_path / "s.md"), "PPO samples", ["p"], {"ppo": ["r"]})
    assert (tmp_path / "s.md").read_text().startswith("# PPO samples\n\n| # | prompt | ppo |")
    with pytest.raises(ValueError, match="'ppo' has 1 rows"):
        samples.sample_table(["p", "q"], {"ppo": ["r"]})


# ------------------------------------------------------------------------------ best-of-n


def test_best_of_k_takes_the_gold_of_the_highest_scored_among_the_first_k():
    scores = np.array([[0.0, 2.0, 1.0, 5.0],
                       [3.0, 1.0, 3.0, 0.0]])  # prompt 2: a tie goes to the earlier response
    gold = np.array([[0.1, 0.2, 0.3, 0.4],
                     [0.5, 0.6, 0.7, 0.8]])
    rows = best_of_n.best_of_n_curve(scores, gold, (1, 2, 4))
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert [r["gold"] for r in rows] == pytest.approx([(0.1 + 0.5) / 2, (0.2 + 0.5) / 2, (0.4 + 0.5) / 2])
    assert [r["oracle"] for r in rows] == pytest.approx([0.3, 0.4, 0.6])
    assert rows[0]["kl_bound"] == 0.0 and rows[2]["kl_bound"] == pytest.approx(np.log(4) - 0.75)
    with pytest.raises(ValueError, match="best-of-5"):
        best_of_n.best_of_n_curve(scores, gold, (5,))
    with pytest.raises(ValueError, match="prompts, samples"):
        best_of_n.best_of_n_curve(scores, gold[:, :3], (1,))


def test_best_of_k_by_a_useful_reward_model_rises_and_by_noise_stays_flat():
    rng = np.random.default_rng(0)
    gold = rng.random((4000, 8))
    useful = best_of_n.best_of_n_curve(gold + 0.3 * rng.standard_normal(gold.shape), gold, (1, 2, 4, 8))
    noise = best_of_n.best_of_n_curve(rng.standard_normal(gold.shape), gold, (1, 2, 4, 8))
    assert [r["gold"] for r in useful] == sorted(r["gold"] for r in useful) and useful[-1]["gold"] > 0.7
    assert all(abs(r["gold"] - 0.5) < 0.02 for r in noise)
    assert all(u["gold"] < u["oracle"] for u in useful[1:])
