"""Scalar heads on the GPT trunk: the reward model (and, from it, PPO's value function).

InstructGPT's RM is the SFT model with the unembedding replaced by a projection to one scalar
(Ouyang et al. 2022, §3.5), read at the final token; the head's weights start N(0, 1/(d_model + 1))
(Stiennon et al. 2020, App. B.1). That is `score="final_token"`. `score="final_token+loglik"` keeps the
SFT model's tied unembedding and adds w · log p(response | prompt) under it, w learned and starting at 1:
the RM starts out as the SFT model's own likelihood of the response (plus the head) and the comparisons
train both terms. On the tiny task suite it ranks responses far better than the final-token RM (agreement
with gold 0.751 vs 0.648), but PPO raises its score without raising gold (README, Results), so it is an
option, not the default. `score="final_token+sft_loglik"` takes the likelihood from a frozen copy of the
SFT model instead (params under train.state.FROZEN_KEY: no gradient, no weight decay), so the term cannot
drift with the trunk; in PPO it equals w · log π_ref. Both forms build the full [sequences, T, vocab]
logits: meant for small vocabularies.

After training, a bias is subtracted so that the labelers' demonstrations score 0 on average (§3.5); it is
stored beside the checkpoint in REWARD_BIAS_FILE with the score's form and applied by
`RewardFunction.score`, the one function later stages call.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructgpt_jax import losses
from instructgpt_jax.errors import CheckpointError
from instructgpt_jax.models import gpt

REWARD_BIAS_FILE = "reward_bias.json"  # {"bias", "score", ...}
SCORES = ("final_token", "final_token+loglik", "final_token+sft_loglik")


class ScalarHead(nn.Module):
    """h [..., d_model] -> [...]: one linear unit, weights N(0, 1/(d_model + 1)) (Stiennon et al. 2020)."""

    d_model: int

    @nn.compact
    def __call__(self, h):
        std = 1.0 / math.sqrt(self.d_model + 1)
        w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(std), ("embed",)), (self.d_model,))
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), ())
        return jnp.einsum("...d,d->...", h.astype(jnp.float32), w) + b


class RewardModel(nn.Module):
    """GPT trunk (params under "trunk", the layout of a GPT checkpoint) + ScalarHead (under "head"); with a
    likelihood term the scalar "loglik_weight", and for score="final_token+sft_loglik" a frozen GPT under
    "frozen_reference" (the RM stage loads the SFT checkpoint into it and into "trunk").

    With last_index [B] returns the score at that token [B] (the EOS, or the last token of a response
    that never ended); without it, a score per position [B, T] (a value function's shape): there the
    likelihood term counts the response tokens up to and including that position. `response_start` [B]
    (the index of each sequence's first response token) is required by the likelihood term.
    """

    cfg: gpt.GPTConfig
    score: str = "final_token"

    def setup(self):
        if self.score not in SCORES:
            raise ValueError(f"reward model score {self.score!r}; expected one of {SCORES}")
        self.trunk = gpt.GPT(self.cfg)
        self.head = ScalarHead(self.cfg.d_model)
        if self.score != "final_token":
            self.loglik_weight = self.param("loglik_weight", nn.with_logical_partitioning(nn.initializers.ones, ()), ())
        if self.score == "final_token+sft_loglik":  # params under train.state.FROZEN_KEY: never updated
            self.frozen_reference = gpt.GPT(self.cfg)

    def __call__(self, tokens, last_index=None, positions=None, kv_valid=None, response_start=None, *,
                 reference_logprobs=None, deterministic=True):
        """`reference_logprobs` [B, T] (score="final_token+sft_loglik" only): log π_frozen(tokens[s] | tokens[<s])
        at each response position s, 0 elsewhere, computed by the caller with the frozen copy's own weights
        (PPO's rollout has them as the reference log-probs); the frozen copy is then not run."""
        h = self.trunk(tokens, positions, kv_valid, deterministic=deterministic, return_hidden=True)
        if self.score == "final_token":
            if last_index is not None:
                h = jnp.take_along_axis(h, last_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
            return self.head(h)
        if response_start is None:
            if not self.is_initializing():
                raise ValueError(f"score={self.score!r} needs response_start (where each response begins)")
            response_start = jnp.zeros(tokens.shape[:1], jnp.int32)
        if reference_logprobs is not None:
            if self.score != "final_token+sft_loglik":
                raise ValueError(f"reference_logprobs replace the frozen copy of score='final_token+sft_loglik'; "
                                 f"this model's score is {self.score!r}")
            per_token = jax.lax.stop_gradient(reference_logprobs.astype(jnp.float32))
        elif self.score == "final_token+sft_loglik":
            logits = jax.lax.stop_gradient(self.frozen_reference(tokens, positions, kv_valid, deterministic=True))
            per_token = response_token_logprobs(logits, tokens, kv_valid, response_start)
        else:
            per_token = response_token_logprobs(self.trunk.unembed(h), tokens, kv_valid, response_start)
        loglik = jnp.cumsum(per_token, axis=1)
        scores = self.head(h) + self.loglik_weight * loglik
        if last_index is not None:
            scores = jnp.take_along_axis(scores, last_index[:, None].astype(jnp.int32), axis=1)[:, 0]
        return scores


def response_token_logprobs(logits, tokens, kv_valid, response_start):
    """[B, T]: log softmax(logits[s − 1])[tokens[s]] at response positions s >= response_start (valid ones,
    with a valid predecessor), 0 elsewhere; their cumulative sum along T is the response's log-likelihood so far."""
    logprobs = losses.token_logprobs(logits[:, :-1], tokens[:, 1:].astype(jnp.int32))
    counted = jnp.arange(1, tokens.shape[1])[None] >= jnp.asarray(response_start)[:, None]
    if kv_valid is not None:
        counted = counted & kv_valid[:, 1:] & kv_valid[:, :-1]
    return jnp.concatenate([jnp.zeros_like(logprobs[:, :1]), jnp.where(counted, logprobs, 0.0)], axis=1)


def sequence_scores(apply_fn, params, tokens, last_index, response_start, rng=None):
    """Scores [B, K] of K responses per prompt, tokens [B, K, T] (last_index, response_start [B, K]): the B·K
    sequences go through the trunk in one forward pass (each response once, not once per pair)."""
    b, k, t = tokens.shape
    deterministic = rng is None
    scores = apply_fn({"params": params}, tokens.reshape(b * k, t), last_index.reshape(b * k),
                      response_start=response_start.reshape(b * k), deterministic=deterministic,
                      rngs=None if deterministic else {"dropout": rng})
    return scores.reshape(b, k)


def write_bias(workdir: str, bias: float, score: str, **details) -> None:
    """Stores the normalising bias (subtracted from every raw score) and the score's form beside the RM's
    checkpoints: what later stages need to rebuild the scoring function."""
    if jax.process_index() == 0:
        path = os.path.join(workdir, REWARD_BIAS_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"bias": float(bias), "score": score, **details}, f, indent=2)
        os.replace(path + ".tmp", path)


def read_record(workdir: str) -> dict:
    """The RM's stored {"bias", "score", ...}; "score" is "final_token" for records written before it existed."""
    path = os.path.join(os.path.abspath(workdir), REWARD_BIAS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {path}: the reward model in {workdir} has not finished (the bias is "
                              "written after training)")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        record = {"score": "final_token", **record, "bias": float(record["bias"])}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a reward-model record ({type(e).__name__}: {e})") from e
    if record["score"] not in SCORES:
        raise CheckpointError(f"{path}: score {record['score']!r}; expected one of {SCORES}")
    return record


def read_bias(workdir: str) -> float:
    return read_record(workdir)["bias"]


def reward_model_of(workdir: str, model_cfg) -> RewardModel:
    """The RewardModel (trunk from model_cfg, score form from the record) of a finished RM workdir."""
    return RewardModel(gpt.GPTConfig.from_config(model_cfg), score=read_record(workdir)["score"])


def fold_bias(params, bias: float):
    """RewardModel params whose raw outputs are the normalised ones (raw − bias): the head's bias absorbs it.
    PPO's value function starts so, at the reward the rollout actually gets (InstructGPT §3.5)."""
    head = params["head"]
    return {**params, "head": {**head, "bias": head["bias"] - jnp.asarray(bias, head["bias"].dtype)}}


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """A trained reward model: `score(params, tokens, last_index, ...)` = raw score − bias (demonstrations ≈ 0)."""

    model: RewardModel
    params: Any
    bias: float

    def score(self, params, tokens, last_index, positions=None, kv_valid=None, response_start=None):
        raw = self.model.apply({"params": params}, tokens, last_index, positions, kv_valid, response_start)
        return raw - self.bias

    @functools.cached_property
    def _jitted_score(self):
        return jax.jit(self.score)

    def __call__(self, tokens, last_index, positions=None, kv_valid=None, response_start=None):
        """Scores with the loaded params (jitted; each input shape compiles once)."""
        return self._jitted_score(self.params, tokens, last_index, positions, kv_valid, response_start)


def load_reward_model(workdir: str, config, mesh) -> RewardFunction:
    """The RM of an RM-stage workdir (latest checkpoint + stored bias and score form), sharded on `mesh` as
    config says.

    config.model must describe the RM's trunk (the same model section as the RM stage's config).
    """
    from instructgpt_jax.train import checkpoint, sharding

    bias = read_bias(workdir)
    model = reward_model_of(workdir, config.model)
    tokens = jnp.zeros((1, config.train.seq_len), jnp.int32)
    abstract, _ = sharding.abstract_init(lambda rng: model.init({"params": rng}, tokens)["params"], mesh,
                                         sharding.rules(config), jax.random.PRNGKey(0))
    params = checkpoint.load_params(workdir, abstract)
    return RewardFunction(model=model, params=params, bias=bias)
