"""PPO rollouts: sampled responses -> policy/reference log-probs, values, RM scores -> rewards -> advantages.

A rollout batch is the sampler's output: left-padded prompts [B, P] followed by responses [B, N] (pad after
EOS). Every model reads it with the same position ids (real tokens only) and padding mask, so the logits at
column P−1+t score response token t, and the value there is V(s_t), the state before token t.

`score_rollout` is one pure function (jitted by `make_scorer`): the forward passes of policy, reference,
value and reward model, then InstructGPT's per-token reward (eq. 2), GAE and advantage whitening. With
`ppo.baseline=leave_one_out` RLOO's baseline (the mean return of the prompt's other samples) replaces GAE
and the value model is not run. The PPO update (`train/steps.make_ppo_step`) reads the same columns
through `response_logprobs`/`response_values`.
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from instructgpt_jax import losses
from instructgpt_jax.models import gpt
from instructgpt_jax.rl import sampling
from instructgpt_jax.train import sharding


@flax.struct.dataclass
class Rollout:
    tokens: jax.Array         # [B, P+N] prompt (left-padded) + response
    prompt_mask: jax.Array    # [B, P] bool
    response_mask: jax.Array  # [B, N] float32: 1 up to and including EOS
    logprobs: jax.Array       # [B, N] log π_old(y_t) at the sampling temperature
    ref_logprobs: jax.Array   # [B, N] log π_SFT(y_t), same temperature
    values: jax.Array         # [B, N] V_old(s_t); 0 with the leave-one-out baseline (no value model)
    scores: jax.Array         # [B] the score rewarded: RM score − bias (or the external score) − no-EOS penalty
    rm_scores: jax.Array      # [B] RM score − bias, also when the reward is external (RM vs gold under optimisation)
    rewards: jax.Array        # [B, N] −β·KL_t, plus the score at the last token
    advantages: jax.Array     # [B, N] GAE (or leave-one-out), whitened over the batch
    returns: jax.Array        # [B, N] value targets: unwhitened advantages + values (leave-one-out: the return)
    kl: jax.Array             # [B, N] log π_old − log π_SFT per token


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """What shapes the reward and advantages (config.ppo); fixed per run."""
    temperature: float = 1.0
    gamma: float = 1.0           # InstructGPT: no discount
    lam: float = 0.95            # GAE λ
    no_eos_penalty: float = 0.0  # subtracted from the score of a response that never emitted EOS
    whiten_rewards: bool = False
    reward: str = "model"        # "model": the RM's score; "gold": scores computed outside (the task suite's)
    baseline: str = "value"      # "value": GAE on the value model; "leave_one_out": the prompt's other samples
    group: int = 1               # consecutive rows sharing a prompt (ppo.samples_per_prompt)
    # The RM's and the value model's likelihood term (score="final_token+sft_loglik") reads the rollout's
    # reference log-probs instead of running their frozen copies: set when those copies hold the reference's
    # weights and the temperature is 1 (stages/ppo checks), so the SFT model runs once per batch, not three times.
    reuse_reference: bool = False

    @classmethod
    def from_config(cls, ppo_cfg, reuse_reference: bool = False) -> "RolloutSettings":
        return cls(temperature=ppo_cfg.temperature, gamma=ppo_cfg.gamma, lam=ppo_cfg.gae_lambda,
                   no_eos_penalty=ppo_cfg.no_eos_penalty, whiten_rewards=ppo_cfg.whiten_rewards,
                   reward=ppo_cfg.reward, baseline=ppo_cfg.baseline, group=ppo_cfg.samples_per_prompt,
                   reuse_reference=reuse_reference)


def sequence_inputs(prompt_mask, response_mask):
    """(positions, valid) [B, P+N] for prompt + response: padding (left of the prompt, after EOS) is invalid."""
    valid = jnp.concatenate([prompt_mask.astype(bool), response_mask > 0], axis=1)
    return sampling.positions_from_mask(valid), valid


def response_logprobs(model, params, tokens, prompt_mask, response_mask, temperature):
    """log π(y_t) [B, N] at the sampling temperature (0 past the response) and the entropy [B, N] of π's
    tempered distribution at each response token. The tied unembedding runs on the response columns only."""
    positions, valid = sequence_inputs(prompt_mask, response_mask)
    hidden = model.apply({"params": params}, tokens[:, :-1], positions[:, :-1], valid[:, :-1], return_hidden=True)
    hidden = hidden[:, prompt_mask.shape[1] - 1:]
    b, n, d = hidden.shape
    logprobs, entropy = losses.tied_head_logprobs(hidden.reshape(b * n, d), gpt.tied_embedding(params),
                                                  tokens[:, prompt_mask.shape[1]:].reshape(b * n),
                                                  model.cfg.vocab_size, temperature)
    return logprobs.reshape(b, n) * response_mask, entropy.reshape(b, n)


def response_starts(prompt_mask):
    """[B] index of the first response token: prompts are left-padded to prompt_mask's width."""
    return jnp.full(prompt_mask.shape[:1], prompt_mask.shape[1], jnp.int32)


def per_position_logprobs(ref_logprobs, prompt_width: int, length: int):
    """Response log-probs [B, N] laid out per sequence position [B, length] (0 over the prompt's columns): the
    `reference_logprobs` a sft_loglik reward/value model reads instead of running its frozen copy."""
    return jnp.pad(ref_logprobs, ((0, 0), (prompt_width, 0)))[:, :length]


def response_values(value_model, params, tokens, prompt_mask, response_mask, ref_logprobs=None):
    """V(s_t) [B, N]: the value head at the column before each response token. With `ref_logprobs` [B, N] a
    sft_loglik value model's likelihood term reads them (RolloutSettings.reuse_reference)."""
    positions, valid = sequence_inputs(prompt_mask, response_mask)
    inputs = tokens[:, :-1]
    reference = None if ref_logprobs is None else per_position_logprobs(ref_logprobs, prompt_mask.shape[1],
                                                                        inputs.shape[1])
    values = value_model.apply({"params": params}, inputs, None, positions[:, :-1], valid[:, :-1],
                               response_starts(prompt_mask), reference_logprobs=reference)
    return values[:, prompt_mask.shape[1] - 1:] * response_mask


def reward_scores(reward_model, params, tokens, prompt_mask, response_mask, bias, ref_logprobs=None):
    """RM score − bias [B], read at each response's last token (EOS, or the last of one that never ended)."""
    positions, valid = sequence_inputs(prompt_mask, response_mask)
    last = prompt_mask.shape[1] + jnp.maximum(response_mask.sum(axis=-1).astype(jnp.int32), 1) - 1
    reference = None if ref_logprobs is None else per_position_logprobs(ref_logprobs, prompt_mask.shape[1],
                                                                        tokens.shape[1])
    return reward_model.apply({"params": params}, tokens, last, positions, valid, response_starts(prompt_mask),
                              reference_logprobs=reference) - bias


def score_rollout(policy_model, reward_model, settings: RolloutSettings, policy_params, value_params, ref_params,
                  rm_params, rm_bias, kl_coef, tokens, prompt_mask, response_mask, ended,
                  external_scores=None) -> Rollout:
    """Everything PPO needs from a sampled batch (pure; no gradients flow through it). With
    settings.reward == "gold", `external_scores` [B] replace the reward model's (an oracle-reward run)."""
    response_mask = response_mask.astype(jnp.float32)
    args = (tokens, prompt_mask, response_mask)
    logprobs, _ = response_logprobs(policy_model, policy_params, *args, settings.temperature)
    ref_logprobs, _ = response_logprobs(policy_model, ref_params, *args, settings.temperature)
    reference = ref_logprobs if settings.reuse_reference else None
    rm_scores = reward_scores(reward_model, rm_params, *args, rm_bias, reference)
    scores = external_scores.astype(jnp.float32) if settings.reward == "gold" else rm_scores
    scores = scores - settings.no_eos_penalty * (1.0 - ended.astype(jnp.float32))
    rewards, kl = losses.kl_penalised_rewards(logprobs, ref_logprobs, scores, response_mask, kl_coef)
    if settings.whiten_rewards:
        rewards = losses.masked_whiten(rewards, response_mask, shift_mean=False)
    if settings.baseline == "leave_one_out":  # the value model is not run
        advantages, sequence_returns = losses.leave_one_out_advantages(rewards, response_mask, settings.group)
        values, returns = jnp.zeros_like(rewards), sequence_returns[:, None] * response_mask
    else:
        values = response_values(reward_model, value_params, *args, reference)
        advantages, returns = losses.generalized_advantages(rewards, values, response_mask, settings.gamma,
                                                            settings.lam)
    return Rollout(tokens=tokens, prompt_mask=prompt_mask, response_mask=response_mask, logprobs=logprobs,
                   ref_logprobs=ref_logprobs, values=values, scores=scores, rm_scores=rm_scores, rewards=rewards,
                   advantages=losses.masked_whiten(advantages, response_mask), returns=returns, kl=kl)


def make_scorer(config, policy_model, reward_model, mesh, policy_shardings, value_shardings,
                reuse_reference: bool = False):
    """Jitted `(policy, value, ref, rm params, rm_bias, kl_coef, output, prompt_mask, external_scores=None)
    -> Rollout`, batch-sharded; β and the bias are traced scalars (an adaptive β never recompiles)."""
    settings = RolloutSettings.from_config(config.ppo, reuse_reference)
    fn = functools.partial(score_rollout, policy_model, reward_model, settings)
    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    jitted = jax.jit(fn, in_shardings=(policy_shardings, value_shardings, policy_shardings, value_shardings,
                                       replicated, replicated, batch, batch, batch, batch, batch),
                     out_shardings=batch)
    in_context = sharding.with_sharding_context(jitted, mesh, sharding.rules(config))

    def scorer(policy_params, value_params, ref_params, rm_params, rm_bias, kl_coef, output, prompt_mask,
               external_scores=None) -> Rollout:
        if external_scores is None:  # unused by the "model" reward; a fixed-shape input keeps one compilation
            external_scores = jnp.zeros_like(output.ended, jnp.float32)
        return in_context(policy_params, value_params, ref_params, rm_params, jnp.float32(rm_bias),
                          jnp.float32(kl_coef), output.tokens, prompt_mask, output.response_mask, output.ended,
                          external_scores)

    return scorer
