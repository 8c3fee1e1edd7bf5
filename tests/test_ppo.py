"""PPO: losses against hand computations and reference loops, rollout scoring, the sharded update, the stage."""
import json
from unittest import mock
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructgpt_jax import losses
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models import gpt, heads
from instructgpt_jax.rl import rollout, sampling
from instructgpt_jax.stages import ppo, rm
from instructgpt_jax.train import checkpoint, sharding, steps
from instructgpt_jax.train.state import FROZEN_KEY
from test_sft import experiment_config, save_initial_model, stage_config, write_tokenizer


# ------------------------------------------------------------------------------ losses


def gae_reference(rewards, values, lengths, gamma, lam):
    advantages = np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t] = last
    returns = (advantages + values) * (np.arange(rewards.shape[1]) < np.array(lengths)[:, None])
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_equals_a_reference_loop(gamma, lam):
    rng = np.random.default_rng(0)
    lengths = [5, 1, 3, 6]
    mask = (np.arange(6) < np.array(lengths)[:, None]).astype(np.float32)
    rewards = rng.normal(size=(4, 6)).astype(np.float32) * mask
    values = rng.normal(size=(4, 6)).astype(np.float32)  # garbage past the end must not leak in
    advantages, returns = losses.generalized_advantages(rewards, values, mask, gamma, lam)
    want_adv, want_ret = gae_reference(rewards, values * mask, lengths, gamma, lam)
    np.testing.assert_allclose(advantages, want_adv, atol=1e-5)
    np.testing.assert_allclose(returns, want_ret, atol=1e-5)


def test_leave_one_out_advantage_is_the_return_minus_the_mean_of_the_prompts_other_samples():
    rng = np.random.default_rng(0)
    lengths = [5, 1, 3, 6, 2, 4]
    mask = (np.arange(6) < np.array(lengths)[:, None]).astype(np.float32)
    rewards = rng.normal(size=(6, 6)).astype(np.float32)  # garbage past the end must not count
    advantages, returns = losses.leave_one_out_advantages(rewards, mask, group=3)
    want_returns = [(rewards[i] * mask[i]).sum() for i in range(6)]
    for i in range(6):
        others = [want_returns[j] for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i]
        np.testing.assert_allclose(advantages[i], (want_returns[i] - np.mean(others)) * mask[i], atol=1e-5)
    np.testing.assert_allclose(returns, want_returns, atol=1e-5)


def test_clipped_surrogate_equals_hand_computed_values():
    # ratios e^0.5 ≈ 1.65 (clipped to 1.2 for A > 0), e^-0.5 ≈ 0.61 (clipped to 0.8 for A < 0), 1.0
    old = np.zeros((1, 4), np.float32)
    new = np.array([[0.5, -0.5, 0.5, 0.0]], np.float32)
    adv = np.array([[1.0, -1.0, -2.0, 3.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    loss, metrics = losses.ppo_policy_loss(new, old, adv, mask, clip=0.2)
    r = np.exp(0.5)
    # per token: max(-A·r, -A·clip(r)): A=1,r=1.65 -> max(-1.65,-1.2) = -1.2; A=-1,r=0.61 -> max(0.61,0.8) = 0.8;
    # A=-2, r=1.65 -> max(3.30, 2.4) = 3.30 (unclipped: pessimistic)
    assert float(loss) == pytest.approx((-1.2 + 0.8 + 2 * r) / 3, abs=1e-5)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 3)
    assert float(metrics["approx_kl"]) == pytest.approx(0.125, abs=1e-6)


def test_value_clipping_equals_hand_computed_values():
    old = np.array([[0.0, 0.0, 1.0]], np.float32)
    new = np.array([[1.0, 0.1, 0.5]], np.float32)
    ret = np.array([[2.0, -1.0, 0.0]], np.float32)
    mask = np.ones((1, 3), np.float32)
    loss, clip_fraction = losses.ppo_value_loss(new, old, ret, mask, clip=0.2)
    # clipped values 0.2, 0.1, 0.8: squared errors max((1-2)²,(0.2-2)²)=3.24, max(1.21,1.21)=1.21, max(0.25,0.64)=0.64
    assert float(loss) == pytest.approx(0.5 * (3.24 + 1.21 + 0.64) / 3, abs=1e-5)
    assert float(clip_fraction) == pytest.approx(2 / 3)


def test_value_clip_fraction_counts_no_token_inside_the_clip_range():
    """V_old + (V − V_old) rounds away from V for many float32 pairs; that must not count as clipping."""
    rng = np.random.default_rng(0)
    old = rng.normal(size=(4, 256)).astype(np.float32)
    new = (old + rng.uniform(-0.19, 0.19, size=old.shape)).astype(np.float32)
    ret = rng.normal(size=old.shape).astype(np.float32)
    assert np.any(old + (new - old) != new)  # the rounding the metric must not count happens here
    _, clip_fraction = losses.ppo_value_loss(new, old, ret, np.ones_like(old), clip=0.2)
    assert float(clip_fraction) == 0.0


def test_kl_penalty_is_per_token_and_the_score_lands_on_the_last_token():
    logprobs = np.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, 0.0, 0.0, 0.0]], np.float32)
    ref = np.array([[-1.5, -1.0, -0.5, -3.0], [-2.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    rewards, kl = losses.kl_penalised_rewards(logprobs, ref, np.array([10.0, -4.0]), mask, kl_coef=0.1)
    np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0, 0.0], [1.0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(rewards, [[-0.05, 0.1, 10.0, 0.0], [-0.1 - 4.0, 0, 0, 0]], atol=1e-6)


@pytest.mark.parametrize("observed,direction", [(12.0, 1), (6.0, 0), (1.0, -1)])
def test_adaptive_kl_controller_moves_beta_towards_the_target(observed, direction):
    new = float(losses.adaptive_kl_coef(0.1, observed, target=6.0, horizon=10_000, n_steps=512))
    assert (new == pytest.approx(0.1, rel=1e-6)) if direction == 0 else np.sign(new - 0.1) == direction
    assert abs(new / 0.1 - 1) <= 0.2 * 512 / 10_000 + 1e-9  # the proportional error is clipped at ±20%


def test_whitening_gives_zero_mean_unit_variance_on_the_mask():
    x = np.array([[1.0, 2.0, 3.0, 100.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    w = np.asarray(losses.masked_whiten(x, mask))
    assert w[0, :3].mean() == pytest.approx(0, abs=1e-6) and w[0, :3].std() == pytest.approx(1, abs=1e-3)
    assert w[0, 3] == 0
    kept = np.asarray(losses.masked_whiten(x, mask, shift_mean=False))
    assert kept[0, :3].mean() == pytest.approx(2.0, abs=1e-5)


def test_explained_variance_is_one_for_perfect_values_and_zero_for_the_mean():
    ret = np.array([[1.0, 2.0, 3.0]], np.float32)
    mask = np.ones_like(ret)
    assert float(losses.explained_variance(ret, ret, mask)) == pytest.approx(1.0)
    assert float(losses.explained_variance(np.full_like(ret, 2.0), ret, mask)) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ rollout and step


@pytest.fixture(scope="module")
def models():
    c = experiment_config("ppo", "size=test,variant=ppo_ptx")
    c.model.vocab_size = c.reward_model.vocab_size = 512
    policy = steps.build_model(c)
    value = heads.RewardModel(gpt.GPTConfig.from_config(c.reward_model))
    tokens = jnp.zeros((1, 16), jnp.int32)
    policy_params = nn.meta.unbox(policy.init(jax.random.PRNGKey(0), tokens)["params"])
    value_params = nn.meta.unbox(value.init(jax.random.PRNGKey(1), tokens)["params"])
    return c, policy, value, policy_params, value_params


def sampled(policy, params, batch=4, prompt_len=6, new=5, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(4, 512, size=n)) for n in rng.integers(2, prompt_len + 1, size=batch)]
    tokens, mask = sampling.left_pad(prompts, prompt_len)
    out = sampling.sample(policy, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(seed),
                          jnp.float32(0.7), jnp.float32(1.0), max_new_tokens=new)
    return out, jnp.asarray(mask)


def score(c, policy, value, policy_params, value_params, out, mask, ref_params=None, kl_coef=0.02, **settings):
    settings = rollout.RolloutSettings(temperature=0.7, **settings)
    external = jnp.linspace(0.0, 1.0, out.tokens.shape[0])
    return rollout.score_rollout(policy, value, settings, policy_params, value_params,
                                 policy_params if ref_params is None else ref_params, value_params, 0.25, kl_coef,
                                 out.tokens, mask, out.response_mask, out.ended, external)


def test_rollout_logprobs_equal_the_samplers_and_kl_to_itself_is_zero(models):
    c, policy, value, policy_params, value_params = models
    out, mask = sampled(policy, policy_params)
    batch = score(c, policy, value, policy_params, value_params, out, mask)
    # the scoring forward pass reads the same columns the sampler drew from (same temperature)
    np.testing.assert_allclose(batch.logprobs, out.logprobs, atol=2e-5)
    np.testing.assert_allclose(batch.kl, 0.0, atol=1e-6)
    raw = value.apply({"params": value_params}, out.tokens, mask.shape[1] + out.lengths - 1,
                      *rollout.sequence_inputs(mask, out.response_mask))
    np.testing.assert_allclose(batch.scores, raw - 0.25, atol=1e-5)
    assert float(jnp.abs(batch.advantages).sum()) > 0


def test_a_loglik_reward_model_counts_only_response_tokens_in_scores_and_values(models):
    c, policy, _, policy_params, _ = models
    value = heads.RewardModel(gpt.GPTConfig.from_config(c.reward_model), score="final_token+loglik")
    value_params = nn.meta.unbox(value.init(jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32))["params"])
    out, mask = sampled(policy, policy_params)
    batch = score(c, policy, value, policy_params, value_params, out, mask)
    positions, valid = rollout.sequence_inputs(mask, out.response_mask)
    p = mask.shape[1]
    apply = lambda first, **kw: value.apply({"params": value_params}, out.tokens, p + out.lengths - 1,  # noqa: E731
                                            positions, valid, jnp.full(mask.shape[:1], first), **kw)
    np.testing.assert_allclose(batch.scores, apply(p) - 0.25, atol=1e-5)
    assert not np.allclose(apply(p), apply(1), atol=1e-3)  # counting the prompt too would change the score
    # The value before the first response token has no response log-likelihood in it yet.
    head_only = value.apply({"params": value_params}, out.tokens, None, positions, valid, jnp.full(mask.shape[:1], 10**6))
    np.testing.assert_allclose(batch.values[:, 0], head_only[:, p - 1], atol=1e-5)


def sft_loglik_value(models, frozen):
    """A final_token+sft_loglik reward/value model whose frozen copy holds `frozen`, and its params."""
    c = models[0]
    value = heads.RewardModel(gpt.GPTConfig.from_config(c.reward_model), score="final_token+sft_loglik")
    params = nn.meta.unbox(value.init(jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32))["params"])
    params[FROZEN_KEY] = jax.tree.map(jnp.copy, frozen)
    params["loglik_weight"] = jnp.float32(0.8)
    return value, params


def test_a_sft_loglik_model_can_read_the_rollouts_reference_logprobs_instead_of_running_its_frozen_copy(models):
    c, policy, _, policy_params, _ = models
    ref = nn.meta.unbox(policy.init(jax.random.PRNGKey(5), jnp.zeros((1, 16), jnp.int32))["params"])
    value, value_params = sft_loglik_value(models, ref)
    out, mask = sampled(policy, policy_params)

    def scored(params, reuse):
        settings = rollout.RolloutSettings(temperature=1.0, reuse_reference=reuse)
        return rollout.score_rollout(policy, value, settings, policy_params, params, ref, params, 0.25, 0.02,
                                     out.tokens, mask, out.response_mask, out.ended)

    ran, reused = scored(value_params, False), scored(value_params, True)
    for field in ("scores", "values", "advantages", "returns"):
        np.testing.assert_allclose(getattr(reused, field), getattr(ran, field), atol=1e-4, err_msg=field)
    # The term is really read from the reference log-probs: a frozen copy of NaNs is never run.
    poisoned = {**value_params, FROZEN_KEY: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), ref)}
    np.testing.assert_allclose(scored(poisoned, True).scores, ran.scores, atol=1e-4)
    assert np.isnan(np.asarray(scored(poisoned, False).scores)).all()
    # ... and the update's value loss reads the minibatch's reference log-probs the same way.
    mb = {k: getattr(ran, k) for k in ppo.STEP_KEYS}
    params = {"policy": policy_params, "value": value_params}
    ppo_cfg = ml_collections.ConfigDict({**c.ppo.to_dict(), "temperature": 1.0, "ptx_coef": 0.0})
    (loss, metrics), grads = jax.value_and_grad(steps.ppo_loss(policy, value, ppo_cfg), has_aux=True)(params, mb, None)
    (loss_r, metrics_r), grads_r = jax.value_and_grad(steps.ppo_loss(policy, value, ppo_cfg, reuse_reference=True),
                                                      has_aux=True)(params, mb, None)
    assert float(loss_r) == pytest.approx(float(loss), abs=1e-4)
    assert float(metrics_r["value_loss"]) == pytest.approx(float(metrics["value_loss"]), abs=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), grads_r, grads)


def test_the_reference_is_reused_only_when_every_frozen_copy_holds_its_weights_at_temperature_1(models):
    _, policy, value, policy_params, value_params = models
    other = nn.meta.unbox(policy.init(jax.random.PRNGKey(5), jnp.zeros((1, 16), jnp.int32))["params"])
    _, same = sft_loglik_value(models, policy_params)
    _, different = sft_loglik_value(models, other)
    assert ppo.reuses_reference(1.0, policy_params, same, same)
    assert not ppo.reuses_reference(0.7, policy_params, same, same)  # the rollout's log-probs are tempered
    assert not ppo.reuses_reference(1.0, policy_params, same, different)
    assert not ppo.reuses_reference(1.0, policy_params, value_params, value_params)  # final_token: no copy
    bigger = {**same, FROZEN_KEY: {**same[FROZEN_KEY], "wpe": {"embedding": jnp.zeros((99, 8))}}}
    assert not ppo.reuses_reference(1.0, policy_params, bigger, same)  # another shape, not an error


def test_gold_reward_replaces_the_rm_score_in_the_rewards_but_the_rm_score_is_still_reported(models):
    c, policy, value, policy_params, value_params = models
    out, mask = sampled(policy, policy_params)
    by_rm = score(c, policy, value, policy_params, value_params, out, mask, kl_coef=0.0)
    by_gold = score(c, policy, value, policy_params, value_params, out, mask, kl_coef=0.0, reward="gold")
    external = np.linspace(0.0, 1.0, out.tokens.shape[0])
    np.testing.assert_allclose(by_gold.scores, external, atol=1e-6)
    np.testing.assert_allclose(by_gold.rm_scores, by_rm.scores, atol=1e-6)
    np.testing.assert_allclose(np.asarray(by_gold.rewards).sum(-1), external, atol=1e-5)  # β = 0: only the score
    np.testing.assert_allclose(np.asarray(by_rm.rewards).sum(-1), by_rm.scores, atol=1e-5)


def test_kl_to_a_different_reference_is_positive_on_average(models):
    c, policy, value, policy_params, value_params = models
    other = nn.meta.unbox(policy.init(jax.random.PRNGKey(7), jnp.zeros((1, 16), jnp.int32))["params"])
    out, mask = sampled(policy, policy_params, batch=16)
    batch = score(c, policy, value, policy_params, value_params, out, mask, ref_params=other)
    assert float(batch.kl.sum(axis=-1).mean()) > 0


def minibatch(models, with_ptx=True):
    c, policy, value, policy_params, value_params = models
    out, mask = sampled(policy, policy_params, batch=8)
    batch = score(c, policy, value, policy_params, value_params, out, mask)
    mb = {k: getattr(batch, k) for k in ppo.STEP_KEYS}
    mb["logprobs"] = mb["logprobs"] - 0.1 * mb["response_mask"]  # an older policy: ratios != 1
    if with_ptx:
        mb["pretrain_tokens"] = jax.random.randint(jax.random.PRNGKey(3), (8, 17), 0, 512)
    return mb


def ppo_update(models, mesh_shape, n_devices, mb, ptx_coef=27.8):
    c, policy, value, policy_params, value_params = models
    c = c.copy_and_resolve_references()
    c.ppo.ptx_coef = ptx_coef
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    mesh = sharding.make_mesh(c, jax.devices()[:n_devices])
    init = ppo.init_state_fn(policy, value, steps.make_ppo_optimizer(c), 16, ema=True)
    state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    params = jax.tree.map(jnp.copy, {"policy": policy_params, "value": value_params})  # the step donates its state
    state = state.replace(params=jax.device_put(params, shardings.params),
                          ema_params=jax.device_put(jax.tree.map(jnp.copy, policy_params), shardings.params["policy"]))
    step = steps.make_ppo_step(c, policy, value, mesh, shardings)
    for _ in range(2):
        state, metrics = step(state, mb)
    return jax.device_get(metrics), jax.device_get(state)


@pytest.fixture(scope="module")
def single_device_update(models):
    mb = minibatch(models)
    return mb, ppo_update(models, (1, 1, 1), 1, mb)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_ppo_step_on_a_mesh_equals_one_device(models, single_device_update, mesh_shape):
    mb, (metrics1, state1) = single_device_update
    metrics8, state8 = ppo_update(models, mesh_shape, 8, mb)
    assert float(metrics8["loss"]) == pytest.approx(float(metrics1["loss"]), rel=1e-6)  # 27.8·ptx: loss ≈ 174
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state1.params, state8.params)


def test_ppo_step_moves_policy_value_and_a_slower_ema(single_device_update, models):
    _, _, _, policy_params, value_params = models
    _, (metrics, state) = single_device_update
    changed = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    assert changed(state.params["policy"], policy_params) and changed(state.params["value"], value_params)
    delta = lambda a: sum(float(np.abs(x - y).sum()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(policy_params)))  # noqa
    # The debiased EMA of two iterates lies between them: further from the start than the first, not the second.
    assert 0.3 * delta(state.params["policy"]) < delta(state.ema_params) < delta(state.params["policy"])
    assert 0 < float(metrics["clip_fraction"]) <= 1 and float(metrics["ptx_loss"]) > 0


def test_ppo_ptx_adds_gamma_times_the_pretraining_lm_loss(models):
    c, policy, value, policy_params, value_params = models
    mb = minibatch(models)
    params = {"policy": policy_params, "value": value_params}
    with_ptx = c.ppo.copy_and_resolve_references()
    without = c.ppo.copy_and_resolve_references()
    with_ptx.ptx_coef, without.ptx_coef = 27.8, 0.0
    loss, metrics = steps.ppo_loss(policy, value, with_ptx)(params, mb, None)
    plain, plain_metrics = steps.ppo_loss(policy, value, without)(params, mb, None)
    assert "ptx_loss" not in plain_metrics
    lm = losses.lm_loss(policy.apply({"params": policy_params}, mb["pretrain_tokens"][:, :-1]), mb["pretrain_tokens"][:, 1:])
    assert float(metrics["ptx_loss"]) == pytest.approx(float(lm), rel=1e-6)
    assert float(loss) == pytest.approx(float(plain) + 27.8 * float(lm), rel=1e-5)


# ------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    return root, write_tokenizer(root / "tokenizer.model")


@pytest.fixture(scope="module")
def earlier_stages(env):
    """sft (a fresh model saved as if trained) and a real RM stage run on its samples."""
    root, tokenizer_path = env
    c = stage_config("rm", root, tokenizer_path)
    c.labeler.num_demonstrations = 200
    c.rm.ceiling_prompts = 50
    save_initial_model(c, str(root / "run" / "sft"))
    rm.run(c, str(root / "run" / "rm"))
    return root / "run"


def ppo_config(env, **ppo):
    root, tokenizer_path = env
    c = stage_config("ppo", root, tokenizer_path, "size=test,variant=ppo_ptx")
    c.ppo.update(dict(batch_size=16, minibatch_size=8, ptx_batch_size=8, eval_prompts=16, eval_lm_batches=1,
                      num_prompts=64, prompt_len=24, max_new_tokens=8), **ppo)
    return c


def test_ppo_stage_trains_evaluates_and_resumes_exactly(env, earlier_stages):
    straight = ppo.run(ppo_config(env, iterations=3), str(earlier_stages / "ppo_straight"))
    ppo.run(ppo_config(env, iterations=2), str(earlier_stages / "ppo_resumed"))
    resumed = ppo.run(ppo_config(env, iterations=3), str(earlier_stages / "ppo_resumed"))
    for name in ("sft", "ppo"):
        assert resumed[name]["sampled"]["gold"] == straight[name]["sampled"]["gold"]
    assert straight["ppo"]["sampled"]["vs_sft"]["gold"]["n"] == 16
    assert straight["sft"]["sampled"]["kl_to_reference"]["mean"] == pytest.approx(0.0, abs=1e-5)
    c = ppo_config(env)
    mesh = sharding.make_mesh(c)
    init = ppo.init_state_fn(steps.build_model(c), ppo.value_model_for(c, str(earlier_stages / "ppo_straight")),
                             steps.make_ppo_optimizer(c), 32, ema=True)
    abstract, _ = sharding.abstract_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    a = checkpoint.Checkpointer(str(earlier_stages / "ppo_straight")).restore(abstract)
    b = checkpoint.Checkpointer(str(earlier_stages / "ppo_resumed")).restore(abstract)
    assert a[1] == b[1] and a[1]["iteration"] == 3  # iteration, β, ptx iterator position
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a[0], b[0])
    rows = [json.loads(line) for line in open(earlier_stages / "ppo_straight" / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[0]["compilations"] > 0 and [r["compilations"] for r in train[1:]] == [0, 0]  # no recompiles
    for key in ("rm_score", "gold_score", "kl", "entropy", "response_length", "clip_fraction", "approx_kl",
                "value_loss", "explained_variance", "ptx_loss", "time_generate", "time_score", "time_update",
                "episodes_per_s"):
        assert np.isfinite(train[-1][key]), key
    assert os.path.isfile(earlier_stages / "ppo_straight" / ppo.EVAL_FILE)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(earlier_stages / "ppo_straight" / "tensorboard"))


def test_ppo_with_the_gold_reward_trains_and_still_reports_the_rm_score(env, earlier_stages):
    ppo.run(ppo_config(env, iterations=1, reward="gold", eval_prompts=0), str(earlier_stages / "ppo_gold"))
    [train] = [json.loads(line) for line in open(earlier_stages / "ppo_gold" / "metrics.jsonl")
               if json.loads(line)["split"] == "train"]
    assert 0.0 <= train["gold_score"] <= 1.0 and np.isfinite(train["rm_score"]) and np.isfinite(train["policy_loss"])


def test_leave_one_out_ppo_samples_each_prompt_k_times_and_leaves_the_value_model_as_loaded(env, earlier_stages):
    c = ppo_config(env, iterations=2, baseline="leave_one_out", samples_per_prompt=4, eval_prompts=0)
    trainer_prompts = []
    original = ppo.Trainer.gold_of

    def recording_gold_of(self, prompts, output):
        trainer_prompts.append(prompts)
        return original(self, prompts, output)

    with mock.patch.object(ppo.Trainer, "gold_of", recording_gold_of):
        ppo.run(c, str(earlier_stages / "ppo_loo"))
    for prompts in trainer_prompts:  # 16 episodes: 4 prompts, each on 4 consecutive rows
        assert len(prompts) == 16 and all(len(set(prompts[i:i + 4])) == 1 for i in range(0, 16, 4))
        assert len(set(prompts)) > 1
    rows = [json.loads(line) for line in open(earlier_stages / "ppo_loo" / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert "value_loss" not in train[-1] and np.isfinite(train[-1]["policy_loss"])
    assert [r["compilations"] for r in train[1:]] == [0]
    mesh = sharding.make_mesh(c)
    value_model = ppo.value_model_for(c, str(earlier_stages / "ppo_loo"))
    init = ppo.init_state_fn(steps.build_model(c), value_model, steps.make_ppo_optimizer(c), 32, ema=True)
    abstract, _ = sharding.abstract_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    state = checkpoint.Checkpointer(str(earlier_stages / "ppo_loo")).restore(abstract)[0]
    rm_params = checkpoint.load_params(str(earlier_stages / "rm"), abstract.params["value"])
    folded = heads.fold_bias(rm_params, heads.read_record(str(earlier_stages / "rm"))["bias"])
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state.params["value"], folded)
    sft_params = checkpoint.load_params(str(earlier_stages / "sft"), abstract.params["policy"])
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), state.params["policy"], sft_params))
    assert max(moved) > 0


def test_ppo_takes_the_score_form_of_the_reward_model_it_loads(env, earlier_stages, capsys):
    """An RM trained with the frozen SFT likelihood term: PPO's value model and evaluation follow its record,
    the term reads the rollout's reference log-probs, and the value's frozen copy is still the RM's after an
    update; a value initialised from an RM of the other form is refused with one error naming both keys."""
    root, tokenizer_path = env
    c = stage_config("rm", root, tokenizer_path)
    c.labeler.num_demonstrations, c.rm.ceiling_prompts, c.rm.best_of_n_prompts = 200, 50, 0
    c.rm.score = "final_token+sft_loglik"
    c.data.comparisons.path = json.load(open(earlier_stages / "rm" / "config.json"))["data"]["comparisons"]["path"]
    rm.run(c, str(earlier_stages / "rm_loglik"))
    assert heads.read_record(str(earlier_stages / "rm_loglik"))["score"] == "final_token+sft_loglik"
    loglik = dict(reward="{workdir}/../rm_loglik", value="{workdir}/../rm_loglik")
    pc = ppo_config(env, iterations=1)
    pc.init.update(loglik)
    capsys.readouterr()
    result = ppo.run(pc, str(earlier_stages / "ppo_loglik"))
    assert np.isfinite(result["ppo"]["sampled"]["rm_score"]["mean"])
    # the RM's frozen copy is the SFT checkpoint PPO's reference loads: the term reads the reference's log-probs
    assert "their likelihood term reads the rollout's reference log-probs" in capsys.readouterr().out
    value = ppo.value_model_for(pc, str(earlier_stages / "ppo_loglik"))
    init = ppo.init_state_fn(steps.build_model(pc), value, steps.make_ppo_optimizer(pc), 32, ema=True)
    abstract, _ = sharding.abstract_init(init, sharding.make_mesh(pc), sharding.rules(pc), jax.random.PRNGKey(0))
    trained = checkpoint.Checkpointer(str(earlier_stages / "ppo_loglik")).restore(abstract)[0].params["value"]
    loaded = checkpoint.load_params(str(earlier_stages / "rm_loglik"), abstract.params["value"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 trained[FROZEN_KEY], loaded[FROZEN_KEY])
    mixed = ppo_config(env, iterations=1)
    mixed.init.value = "{workdir}/../rm_loglik"
    with pytest.raises(ConfigError, match=r"init.reward=.* scores 'final_token' but init.value=.* 'final_token\+sft_loglik'"):
        ppo.run(mixed, str(earlier_stages / "ppo_mixed"))
    assert not os.path.exists(earlier_stages / "ppo_mixed")  # refused before any work


def test_ppo_dry_run_without_a_finished_rm_assumes_the_final_token_form(env, capsys):
    c = ppo_config(env)
    c.dry_run = True
    plan = ppo.run(c, "/nonexistent/never/created/ppo")
    assert plan["params_gib"] > 0 and not os.path.exists("/nonexistent")
    assert "the dry run assumes score='final_token'" in capsys.readouterr().out


@pytest.mark.parametrize("key,value,message", [
    ("ppo.minibatch_size", 3, "not divisible by ppo.minibatch_size"),
    ("ppo.max_new_tokens", 200, "exceeds model.max_len"),
    ("ppo.overlong_prompts", "cut", "overlong_prompts"),
    ("init.reward", "", "init.reward"),
    ("ppo.reward", "oracle", "ppo.reward"),
    ("ppo.baseline", "mean", "ppo.baseline"),
    ("ppo.samples_per_prompt", 3, "ppo.samples_per_prompt=3 must be >= 1 and divide ppo.batch_size=16"),
    ("ppo.samples_per_prompt", 1, "leave_one_out.*needs ppo.samples_per_prompt >= 2"),
])
def test_bad_ppo_config_names_the_key(env, key, value, message):
    c = ppo_config(env, baseline="leave_one_out", samples_per_prompt=2) if "leave_one_out" in message else ppo_config(env)
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=message):
        ppo.validate_ppo_config(c)


# ------------------------------------------------------------------------------ parallelism = "pmap"


def test_ppo_ptx_step_under_pmap_equals_one_device(models):
    """The pure data-parallel step on 8 devices (one row each, 1..5 response tokens: the PPO terms are means
    over response tokens, the ptx term over pretraining rows) gives the loss, metrics and update of 1 device."""
    from test_train import assert_same_update

    mb = minibatch(models)
    lengths = np.array([5, 1, 3, 2, 5, 4, 1, 5])
    mb["response_mask"] = (np.arange(mb["response_mask"].shape[1]) < lengths[:, None]).astype(np.float32)
    one = ppo_update(models, (1, 1, 1), 1, mb)
    c = models[0].copy_and_resolve_references()
    c.parallelism = "pmap"
    eight = ppo_update((c, *models[1:]), (8, 1, 1), 8, mb)
    assert_same_update(one, eight, keys=("loss", "policy_loss", "value_loss", "entropy", "ptx_loss", "clip_fraction",
                                         "approx_kl", "value_clip_fraction", "grad_norm"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), one[1].ema_params, eight[1].ema_params)
