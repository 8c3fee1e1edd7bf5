"""Scalar heads on the GPT trunk: the reward model (and, from it, PPO's value function).

InstructGPT's RM is the SFT model with the unembedding replaced by a projection to one scalar
(Ouyang et al. 2022, §3.5), read at the final token; the head's weights start N(0, 1/(d_model + 1))
(Stiennon et al. 2020, App. B.1). After training, a bias is subtracted so that the labelers'
demonstrations score 0 on average (§3.5); it is stored beside the checkpoint in REWARD_BIAS_FILE and
applied by `RewardFunction.score`, the one function later stages call.
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

from instructgpt_jax.errors import CheckpointError
from instructgpt_jax.models import gpt

REWARD_BIAS_FILE = "reward_bias.json"


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
    """GPT trunk (params under "trunk", the layout of a GPT checkpoint) + ScalarHead (under "head").

    With last_index [B] returns the score at that token [B] (the EOS, or the last token of a response
    that never ended); without it, a score per position [B, T] (a value function's shape).
    """

    cfg: gpt.GPTConfig

    def setup(self):
        self.trunk = gpt.GPT(self.cfg)
        self.head = ScalarHead(self.cfg.d_model)

    def __call__(self, tokens, last_index=None, positions=None, kv_valid=None, *, deterministic=True):
        h = self.trunk(tokens, positions, kv_valid, deterministic=deterministic, return_hidden=True)
        if last_index is not None:
            h = jnp.take_along_axis(h, last_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return self.head(h)


def sequence_scores(apply_fn, params, tokens, last_index, rng=None):
    """Scores [B, K] of K responses per prompt, tokens [B, K, T]: the B·K sequences go through the
    trunk in one forward pass (each response once, not once per pair)."""
    b, k, t = tokens.shape
    deterministic = rng is None
    scores = apply_fn({"params": params}, tokens.reshape(b * k, t), last_index.reshape(b * k),
                      deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
    return scores.reshape(b, k)


def write_bias(workdir: str, bias: float, **details) -> None:
    """Stores the normalising bias (subtracted from every raw score) beside the RM's checkpoints."""
    if jax.process_index() == 0:
        path = os.path.join(workdir, REWARD_BIAS_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"bias": float(bias), **details}, f, indent=2)
        os.replace(path + ".tmp", path)


def read_bias(workdir: str) -> float:
    path = os.path.join(os.path.abspath(workdir), REWARD_BIAS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {path}: the reward model in {workdir} has not finished (the bias is "
                              "written after training)")
    with open(path, encoding="utf-8") as f:
        return float(json.load(f)["bias"])


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """A trained reward model: `score(params, tokens, last_index)` = raw score − bias (demonstrations ≈ 0)."""

    model: RewardModel
    params: Any
    bias: float

    def score(self, params, tokens, last_index, positions=None, kv_valid=None):
        raw = self.model.apply({"params": params}, tokens, last_index, positions, kv_valid)
        return raw - self.bias

    @functools.cached_property
    def _jitted_score(self):
        return jax.jit(self.score)

    def __call__(self, tokens, last_index, positions=None, kv_valid=None):
        """Scores with the loaded params (jitted; each input shape compiles once)."""
        return self._jitted_score(self.params, tokens, last_index, positions, kv_valid)


def load_reward_model(workdir: str, config, mesh) -> RewardFunction:
    """The RM of an RM-stage workdir (latest checkpoint + stored bias), sharded on `mesh` as config says.

    config.model must describe the RM's trunk (the same model section as the RM stage's config).
    """
    from instructgpt_jax.train import checkpoint, sharding

    bias = read_bias(workdir)
    model = RewardModel(gpt.GPTConfig.from_config(config.model))
    tokens = jnp.zeros((1, config.train.seq_len), jnp.int32)
    abstract, _ = sharding.abstract_init(lambda rng: model.init({"params": rng}, tokens)["params"], mesh,
                                         sharding.rules(config), jax.random.PRNGKey(0))
    params = checkpoint.load_params(workdir, abstract)
    return RewardFunction(model=model, params=params, bias=bias)
