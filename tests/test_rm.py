"""Reward model: batching of ranked responses, one forward per response, the head, the stage end to end."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import losses
from instructgpt_jax.data import pipeline, sources, tokenizer as tokenizer_lib
from instructgpt_jax.errors import CheckpointError, ConfigError
from instructgpt_jax.models import gpt, heads
from instructgpt_jax.rl import sampling
from instructgpt_jax.stages import rm
from instructgpt_jax.train import checkpoint, sharding, steps
from instructgpt_jax.train.state import FROZEN_KEY, make_optimizer
from test_sft import experiment_config, save_initial_model, stage_config, write_tokenizer
from test_train import LAYOUTS, assert_same_update, stage_step_on_devices


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    return root, write_tokenizer(root / "tokenizer.model")


@pytest.fixture(scope="module")
def reward_model(env):
    c = stage_config("rm", *env)
    model = heads.RewardModel(gpt.GPTConfig.from_config(c.model))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, c.train.seq_len), jnp.int32))["params"]
    return c, model, nn.meta.unbox(params)


def test_comparison_example_pads_responses_and_marks_their_last_token():
    ex = pipeline.comparison_example([[5, 6, 7, 1], [5, 6, 1], [5, 6, 8, 9, 10]], prompt_len=2, pad_id=0, seq_len=6,
                                     max_responses=4)
    np.testing.assert_array_equal(ex["tokens"], [[5, 6, 7, 1, 0, 0], [5, 6, 1, 0, 0, 0], [5, 6, 8, 9, 10, 0], [0] * 6])
    np.testing.assert_array_equal(ex["last_index"], [3, 2, 4, 0])
    np.testing.assert_array_equal(ex["response_start"], [2, 2, 2, 2])
    assert int(ex["num_responses"]) == 3


def test_tokenize_comparison_ends_with_eos_only_when_ended_and_drops_overlong(env):
    tok = tokenizer_lib.Tokenizer.from_file(env[1])
    record = {"prompt": "Repeat: cat dog\nAnswer:", "responses": [" cat dog", " cat", " dog" * 30],
              "ended": [True, False, True]}
    ex, kept = pipeline.tokenize_comparison(record, tok, 32, 4, "f.jsonl:1")
    assert kept == [0, 1] and int(ex["num_responses"]) == 2
    first, second = (ex["tokens"][k, :ex["last_index"][k] + 1] for k in (0, 1))
    assert first[-1] == tok.eos_id and second[-1] != tok.eos_id
    assert tok.decode(first) == record["prompt"] + " cat dog"
    assert tok.decode(first[:ex["response_start"][0]]) == record["prompt"]
    with pytest.raises(ConfigError, match=r"f.jsonl:1: 3 responses, more than rm.max_responses=2"):
        pipeline.tokenize_comparison(record, tok, 32, 2, "f.jsonl:1")
    assert pipeline.tokenize_comparison({**record, "responses": record["responses"][1:], "ended": [True, True]},
                                        tok, 32, 4, "x")[0] is None  # one response left: no pair


class CountingModel:
    """Records the shape of every batch that enters the model."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def apply(self, variables, tokens, *args, **kwargs):
        self.calls.append(tokens.shape)
        return self.model.apply(variables, tokens, *args, **kwargs)


def test_each_response_goes_through_the_trunk_once_not_once_per_pair(reward_model):
    c, model, params = reward_model
    b, k, t = 3, 4, c.train.seq_len
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(4, 300, size=(b, k, t)), jnp.int32),
             "last_index": jnp.asarray(rng.integers(5, t, size=(b, k)), jnp.int32),
             "response_start": jnp.full((b, k), 3, jnp.int32), "num_responses": jnp.array([4, 2, 3], jnp.int32)}
    counting = CountingModel(model)
    loss, _ = jax.jit(steps.rm_loss(counting))(params, batch, None)  # shapes are recorded while tracing
    assert counting.calls == [(b * k, t)]  # 12 sequences in one call; the pairs number 6 + 1 + 3
    score_row = jax.jit(lambda tokens, last: model.apply({"params": params}, tokens, last))
    scores = jnp.stack([score_row(batch["tokens"][i], batch["last_index"][i]) for i in range(b)])
    assert float(loss) == pytest.approx(float(losses.pairwise_ranking_loss(scores, batch["num_responses"])), rel=1e-5)


def planted_batch(rng, batch_size, seq_len, good=7, bad=9):
    """K=2: random prompts answered by `good` (ranked first) or `bad`, then EOS; one padding slot (K_max 3)."""
    tokens = np.zeros((batch_size, 3, seq_len), np.int32)
    last, first = np.zeros((batch_size, 3), np.int32), np.zeros((batch_size, 3), np.int32)
    for i in range(batch_size):
        prompt = list(rng.integers(20, 300, size=int(rng.integers(3, 20))))
        for k, answer in enumerate((good, bad)):
            ids = prompt + [answer, 1]
            tokens[i, k, :len(ids)], last[i, k], first[i, k] = ids, len(ids) - 1, len(prompt)
    return {"tokens": tokens, "last_index": last, "response_start": first,
            "num_responses": np.full(batch_size, 2, np.int32)}


def test_rm_step_learns_a_planted_preference(env):
    c = stage_config("rm", *env)
    c.optim.lr = 3e-3
    mesh = sharding.make_mesh(c)
    model = heads.RewardModel(gpt.GPTConfig.from_config(c.model))
    init = steps.init_state_fn(model, make_optimizer(c.optim), c.train.seq_len)
    state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    step = steps.make_rm_step(c, model, mesh, shardings)
    to_device = lambda b: pipeline.to_global_batch(b, sharding.batch_sharding(mesh))  # noqa: E731
    rng = np.random.default_rng(0)
    for _ in range(25):
        state, metrics = step(state, to_device(planted_batch(rng, c.train.batch_size, c.train.seq_len)))
    held_out = steps.make_rm_eval_step(c, model, mesh, shardings.params)(
        state.params, to_device(planted_batch(rng, c.train.batch_size, c.train.seq_len)))
    assert float(held_out["accuracy"]) == 1.0 and float(held_out["loss"]) < 0.2


def test_score_is_read_at_the_last_token_and_ignores_padding_on_either_side(reward_model):
    c, model, params = reward_model
    ids = [5, 17, 29, 41, 7, 1]
    right = jnp.zeros((1, 16), jnp.int32).at[0, :6].set(jnp.array(ids))
    apply = jax.jit(lambda *args: model.apply({"params": params}, *args))
    per_token = apply(right)
    at_last = apply(right, jnp.array([5]))
    assert float(at_last[0]) == pytest.approx(float(per_token[0, 5]), abs=1e-6)
    left = jnp.zeros((1, 16), jnp.int32).at[0, 10:].set(jnp.array(ids))  # as the sampler lays sequences out
    valid = left != 0
    from_left = apply(left, jnp.array([15]), sampling.positions_from_mask(valid), valid)
    assert float(from_left[0]) == pytest.approx(float(at_last[0]), abs=1e-4)


@pytest.fixture(scope="module")
def loglik_model(env):
    c = stage_config("rm", *env)
    model = heads.RewardModel(gpt.GPTConfig.from_config(c.model), score="final_token+loglik")
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32))["params"])
    params["loglik_weight"] = jnp.float32(0.7)  # not its initial 1, so the test sees the weight used
    return c, model, params


def test_loglik_score_adds_the_weighted_log_likelihood_of_the_response_only(loglik_model):
    c, model, params = loglik_model
    prompt, response = [5, 17, 29], [41, 7, 1]
    tokens = jnp.zeros((1, 16), jnp.int32).at[0, :6].set(jnp.array(prompt + response))
    trunk = gpt.GPT(model.cfg)
    logprobs = jax.nn.log_softmax(trunk.apply({"params": params["trunk"]}, tokens)[0], axis=-1)
    hidden = trunk.apply({"params": params["trunk"]}, tokens, return_hidden=True)[0, 5]
    final_token = float(heads.ScalarHead(model.cfg.d_model).apply({"params": params["head"]}, hidden))
    loglik = sum(float(logprobs[s - 1, tokens[0, s]]) for s in range(3, 6))  # the response's 3 tokens
    apply = jax.jit(lambda *args: model.apply({"params": params}, *args))
    score = float(apply(tokens, jnp.array([5]), None, None, jnp.array([3]))[0])
    assert score == pytest.approx(final_token + 0.7 * loglik, abs=1e-4)
    # Per position (the value function's shape), the term counts the response so far; the prompt never.
    per_position = apply(tokens, None, None, None, jnp.array([3]))[0]
    head_only = heads.ScalarHead(model.cfg.d_model).apply(
        {"params": params["head"]}, trunk.apply({"params": params["trunk"]}, tokens, return_hidden=True)[0])
    np.testing.assert_allclose(per_position[:3], head_only[:3], atol=1e-5)
    assert float(per_position[5]) == pytest.approx(score, abs=1e-4)
    # Left-padded as the sampler lays sequences out: the same score.
    left = jnp.zeros((1, 16), jnp.int32).at[0, 10:].set(jnp.array(prompt + response))
    valid = left != 0
    from_left = apply(left, jnp.array([15]), sampling.positions_from_mask(valid), valid, jnp.array([13]))
    assert float(from_left[0]) == pytest.approx(score, abs=1e-4)
    with pytest.raises(ValueError, match="needs response_start"):
        model.apply({"params": params}, tokens, jnp.array([5]))


def test_sft_loglik_score_reads_the_frozen_copy_which_no_rm_step_changes(env, tmp_path):
    c = stage_config("rm", *env)
    c.optim.lr = 3e-3
    model = heads.RewardModel(gpt.GPTConfig.from_config(c.model), score="final_token+sft_loglik")
    mesh = sharding.make_mesh(c)
    init = steps.init_state_fn(model, make_optimizer(c.optim), c.train.seq_len)
    state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    frozen = nn.meta.unbox(state.params[FROZEN_KEY])
    # The term is w · log p(response | prompt) under the frozen copy, not under the trunk.
    tokens = jnp.zeros((1, c.train.seq_len), jnp.int32).at[0, :6].set(jnp.array([5, 17, 29, 41, 7, 1]))
    logprobs = jax.nn.log_softmax(gpt.GPT(model.cfg).apply({"params": frozen}, tokens)[0], axis=-1)
    loglik = sum(float(logprobs[s - 1, tokens[0, s]]) for s in range(3, 6))
    params = nn.meta.unbox(state.params)
    with_term = float(model.apply({"params": params}, tokens, jnp.array([5]), None, None, jnp.array([3]))[0])
    without = float(model.apply({"params": {**params, "loglik_weight": jnp.float32(0.0)}}, tokens, jnp.array([5]),
                                None, None, jnp.array([3]))[0])
    assert with_term - without == pytest.approx(loglik, abs=1e-4)
    # AdamW with weight decay: the trunk moves, the frozen copy does not (no gradient, no decay).
    frozen, trunk = jax.device_get(frozen), jax.device_get(params["trunk"])  # the step donates the state
    step = steps.make_rm_step(c, model, mesh, shardings)
    to_device = lambda b: pipeline.to_global_batch(b, sharding.batch_sharding(mesh))  # noqa: E731
    rng = np.random.default_rng(0)
    for _ in range(3):
        state, _ = step(state, to_device(planted_batch(rng, c.train.batch_size, c.train.seq_len)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 nn.meta.unbox(state.params[FROZEN_KEY]), frozen)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         nn.meta.unbox(state.params["trunk"]), trunk)
    assert max(jax.tree.leaves(moved)) > 0
    # and the optimizer holds no moments for it: two per trained parameter, none per frozen one (scalars left
    # out on both sides: they would mix with the step counts)
    trained = sum(x.size for k, v in params.items() if k != FROZEN_KEY for x in jax.tree.leaves(v) if x.ndim > 0)
    moments = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(state.opt_state)) if x.ndim > 0)
    assert moments == 2 * trained
    # a state holding no moments for the frozen copy saves and restores (resuming an interrupted RM run)
    ck = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ck.save(3, state)
    abstract = sharding.abstract_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))[0]
    restored, _ = ck.restore(abstract)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)


def test_reward_record_carries_the_score_form_and_folds_into_the_value_head(tmp_path, loglik_model):
    c, model, params = loglik_model
    heads.write_bias(str(tmp_path), 2.5, "final_token+loglik", step=3)
    assert heads.read_record(str(tmp_path)) == {"bias": 2.5, "score": "final_token+loglik", "step": 3}
    assert heads.reward_model_of(str(tmp_path), c.model).score == "final_token+loglik"
    tokens, first = jnp.array([[5, 17, 29, 41, 7, 1]]), jnp.array([3])
    raw = model.apply({"params": params}, tokens, None, None, None, first)
    folded = model.apply({"params": heads.fold_bias(params, 2.5)}, tokens, None, None, None, first)
    np.testing.assert_allclose(folded, raw - 2.5, atol=1e-5)
    with open(os.path.join(tmp_path, heads.REWARD_BIAS_FILE), "w") as f:
        json.dump({"bias": 1.0}, f)  # written before the score form was recorded
    assert heads.read_record(str(tmp_path))["score"] == "final_token"
    with open(os.path.join(tmp_path, heads.REWARD_BIAS_FILE), "w") as f:
        json.dump({"bias": 1.0, "score": "mean"}, f)
    with pytest.raises(CheckpointError, match=r"reward_bias.json: score 'mean'"):
        heads.read_record(str(tmp_path))


def test_head_starts_with_std_one_over_sqrt_d_model_plus_one():
    params = heads.ScalarHead(4095).init(jax.random.PRNGKey(0), jnp.zeros((1, 4095)))["params"]
    kernel = np.asarray(nn.meta.unbox(params)["kernel"])
    assert kernel.std() == pytest.approx(1 / 64, rel=0.05) and float(nn.meta.unbox(params)["bias"]) == 0.0


@pytest.mark.parametrize("key,value,message", [
    ("max_responses", 1, "rm.max_responses=1"),
    ("responses_per_prompt", 5, "rm.responses_per_prompt=5"),
    ("samples", "humans", "rm.samples='humans'"),
    ("best_of_n", (0, 2), r"rm.best_of_n_prompts=8 .* rm.best_of_n=\(0, 2\)"),
    ("best_of_n_prompts", -1, "rm.best_of_n_prompts=-1"),
    ("score", "mean", "rm.score='mean'"),
])
def test_bad_rm_config_names_the_key(env, key, value, message):
    c = stage_config("rm", *env)
    c.rm[key] = value
    with pytest.raises(ConfigError, match=message):
        rm.run(c, "unused")


def test_missing_sft_checkpoint_names_the_directory(env, tmp_path):
    with pytest.raises(CheckpointError, match=r"init.params=.*nowhere/sft.*no checkpoint"):
        rm.run(stage_config("rm", *env), str(tmp_path / "nowhere" / "rm"))


@pytest.fixture(scope="module")
def rm_run(env):
    """The stage on default comparisons sampled from a (freshly initialised) policy with the KV-cache sampler."""
    root, tokenizer_path = env
    c = stage_config("rm", root, tokenizer_path)
    c.labeler.num_demonstrations = 200
    c.rm.ceiling_prompts = 100
    save_initial_model(c, str(root / "run" / "sft"))
    workdir = str(root / "run" / "rm")
    return c, workdir, rm.run(c, workdir)


def test_stage_writes_checkpoint_bias_and_held_out_metrics(rm_run):
    c, workdir, metrics = rm_run
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    assert os.path.isfile(os.path.join(workdir, heads.REWARD_BIAS_FILE))
    written = json.loads(open(os.path.join(workdir, rm.EVAL_FILE)).read())
    assert written["pairs"] > 0 and 0.0 <= written["accuracy"] <= 1.0
    assert written["labeler_agreement_ceiling"] == pytest.approx(0.73, abs=0.05)
    assert written["demonstrations_mean_after_bias"] == pytest.approx(0.0, abs=1e-5)
    first = json.loads(open(c.data.comparisons.path).readline())
    assert len(first["responses"]) == len(first["ended"]) >= 2  # sampled, ranked, with ended flags
    best_of = written["best_of_n"]
    assert best_of["prompts"] == c.rm.best_of_n_prompts == 8
    assert [r["k"] for r in best_of["curve"]] == list(c.rm.best_of_n)
    assert all(0.0 <= r["gold"] <= r["oracle"] <= 1.0 for r in best_of["curve"])
    assert best_of["curve"][0]["gold"] == best_of["curve"][0]["oracle"]  # best-of-1 is the sample itself


def test_loaded_reward_model_scores_held_out_demonstrations_zero_on_average(rm_run):
    c, workdir, _ = rm_run
    reward = heads.load_reward_model(workdir, c, sharding.make_mesh(c))
    tok = tokenizer_lib.Tokenizer.from_file(c.tokenizer.path)
    demos = list(sources.read_examples(sources.build_jsonl_source("demonstrations", c.data), "validation"))
    seqs = [pipeline.response_tokens(tok.encode(d["prompt"]), tok.encode(d["completion"]), True, tok.eos_id)
            for d in demos]
    tokens = np.zeros((len(seqs), c.train.seq_len), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    starts = np.array([len(tok.encode(d["prompt"])) for d in demos])
    scores = np.asarray(reward(tokens, np.array([len(s) - 1 for s in seqs]), None, None, starts))
    assert reward.model.score == c.rm.score
    assert len(scores) >= 5 and abs(scores.mean()) < 1e-4
    assert scores.std() > 0  # a real score, not a constant


# ------------------------------------------------------------------------------ the step on 8 devices


@pytest.fixture(scope="module")
def rm_update_on_one_device(reward_model):
    """Two RM steps on prompts with K = 4, 2, 3, 0 (padding), 2, 4, 1 (no pair), 3 responses:
    test_train.stage_step_on_devices."""
    c, model, params = reward_model
    rng = np.random.default_rng(0)
    b, k, t = 8, c.rm.max_responses, c.train.seq_len
    batch = {"tokens": rng.integers(4, 300, size=(b, k, t)).astype(np.int32),
             "last_index": rng.integers(5, t, size=(b, k)).astype(np.int32),
             "response_start": rng.integers(1, 5, size=(b, k)).astype(np.int32),
             "num_responses": np.array([4, 2, 3, 0, 2, 4, 1, 3], np.int32)}
    return stage_step_on_devices(c, model, steps.make_rm_step, batch, params)


@pytest.mark.parametrize("mesh_shape,parallelism", LAYOUTS)
def test_rm_step_on_8_devices_equals_one_device(rm_update_on_one_device, mesh_shape, parallelism):
    on, one = rm_update_on_one_device
    assert_same_update(one, on(mesh_shape, 8, parallelism=parallelism), keys=("loss", "accuracy", "mean_score"))


def test_the_reported_ceiling_follows_the_labelers_noise():
    c = experiment_config("rm", "size=test")
    c.rm.ceiling_prompts = 200
    c.labeler.noise = 0.0
    assert rm.labeler_ceiling(c) == 1.0  # noise-free labelers always agree
    c.labeler.noise = 0.6
    assert rm.labeler_ceiling(c) < 0.7
