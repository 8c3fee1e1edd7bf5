"""Step factories: each builds a jitted pure function `(state, batch) -> (state, metrics)` from config.

A stage contributes only its loss, `loss_fn(params, batch, rng) -> (loss, metrics)`; the update
(gradients, clipping, AdamW, skipping non-finite updates, EMA) is shared by all of them. The
step's randomness (dropout) is `fold_in(state.rng, state.step)`, so a resumed run repeats it.
`config.parallelism` picks how a step runs: "mesh" (jit with declared shardings) or "pmap" (pure data
parallelism, train/pmap.py), for which a loss declares what its means are over (pmap.WEIGHTS, pmap.TERMS).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from instructgpt_jax import losses
from instructgpt_jax.models import gpt
from instructgpt_jax.train import pmap, sharding
from instructgpt_jax.train.state import TrainState, create_state, learning_rate_schedule, make_optimizer

LossFn = Callable[..., tuple[jax.Array, dict]]


def build_model(config) -> gpt.GPT:
    return gpt.GPT(gpt.GPTConfig.from_config(config.model))


def init_state_fn(model: gpt.GPT, tx: optax.GradientTransformation, seq_len: int, ema: bool = False):
    """Returns rng -> TrainState with nn.Partitioned (logically named) leaves, for sharding.sharded_init."""

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init({"params": params_rng}, tokens)["params"]
        return create_state(params, tx, state_rng, ema=ema)

    return init


def ema_step_size(decay: float, count):
    """Step size of the incremental debiased EMA: with ê_t = ê_{t-1} + s_t (θ_t − ê_{t-1}) and
    s_t = (1 − d) / (1 − d^t), ê_t equals optax.ema's debiased average of θ_1..θ_t (ê_1 = θ_1)."""
    return (1.0 - decay) / (1.0 - decay ** jnp.asarray(count, jnp.float32))


def apply_update(state: TrainState, grads, tx: optax.GradientTransformation, ema_decay: float | None = None,
                 ema_of=lambda params: params, loss=0.0):
    """One optimizer update; a non-finite loss or gradient leaves params and optimizer state unchanged.
    With ema_decay, state.ema_params tracks ema_of(params) (e.g. only the policy of a PPO state): a debiased
    EMA of the iterates, as optax.ema(debias=True), so that after a short run it is not partly the initial
    weights (0.992 leaves 28% on them after 160 updates)."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
    ema = state.ema_params
    if ema is not None and ema_decay is not None:
        ema = optax.incremental_update(ema_of(params), ema, step_size=ema_step_size(ema_decay, state.step + 1))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, {"grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}


def make_update_step(loss_fn: LossFn, config, mesh, state_shardings, batch_shardings, ema_decay=None,
                     ema_of=lambda params: params, tx: optax.GradientTransformation | None = None):
    """Jitted `(state, batch) -> (state, metrics)` with declared shardings and the state donated; with
    config.parallelism == "pmap" the same step as a pure data-parallel program (train/pmap.py).
    tx defaults to the optimizer of config.optim."""
    tx = make_optimizer(config.optim) if tx is None else tx
    schedule = learning_rate_schedule(config.optim)
    if config.parallelism == "pmap":
        update = lambda state, grads, loss: apply_update(state, grads, tx, ema_decay, ema_of, loss)  # noqa: E731
        return pmap.make_pmap_update_step(loss_fn, mesh, state_shardings, batch_shardings, update, schedule)

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        metrics = pmap.strip_declarations(metrics)
        new_state, update_metrics = apply_update(state, grads, tx, ema_decay, ema_of, loss)
        return new_state, {**metrics, **update_metrics, "loss": loss, "lr": schedule(state.step)}

    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    return sharding.with_sharding_context(jitted, mesh, sharding.rules(config))


def make_eval_step(loss_fn: LossFn, config, mesh, params_shardings, batch_shardings):
    """Jitted `(params, batch) -> metrics`, deterministic (no dropout)."""

    def evaluate(params, batch):
        loss, metrics = loss_fn(params, batch, None)
        return {**pmap.strip_declarations(metrics), "loss": loss}

    jitted = jax.jit(evaluate, in_shardings=(params_shardings, batch_shardings), out_shardings=sharding.replicated(mesh))
    return sharding.with_sharding_context(jitted, mesh, sharding.rules(config))


def forward(model: gpt.GPT, params, inputs, rng, return_hidden: bool = False):
    """model(inputs): logits (or final hidden states); dropout when rng is given, deterministic when None."""
    deterministic = rng is None
    return model.apply({"params": params}, inputs, deterministic=deterministic,
                       rngs=None if deterministic else {"dropout": rng}, return_hidden=return_hidden)


def lm_head_chunk(model) -> int:
    """model.cfg.lm_head_chunk; 0 (full logits) for a stand-in with only .apply (tests probe the logits so)."""
    return getattr(getattr(model, "cfg", None), "lm_head_chunk", 0)


def chunked_nll_sums(model: gpt.GPT, params, tokens, weights, rng):
    """Σ_t weights[k, t]·NLL(tokens[:, t+1]) for K fixed weightings [K, B, T] of sequences tokens [B, T+1],
    the LM head run model.cfg.lm_head_chunk tokens at a time (no [B, T, vocab] logits)."""
    hidden = forward(model, params, tokens[:, :-1], rng, return_hidden=True)
    return losses.chunked_lm_head_losses(hidden, gpt.tied_embedding(params), tokens[:, 1:], weights,
                                         model.cfg.vocab_size, lm_head_chunk(model))


def next_token_loss(model: gpt.GPT, params, tokens, rng):
    """losses.lm_loss of packed sequences tokens [B, T+1], through the chunked LM head if the model has one."""
    targets = tokens[:, 1:]
    if lm_head_chunk(model):
        uniform = jnp.full((1, *targets.shape), 1.0 / targets.size)
        return chunked_nll_sums(model, params, tokens, uniform, rng)[0]
    return losses.lm_loss(forward(model, params, tokens[:, :-1], rng), targets)


def sft_terms(model: gpt.GPT, params, tokens, loss_mask, rng, with_prompt: bool) -> dict:
    """losses.sft_loss_terms of tokens [B, T+1], through the chunked LM head if the model has one (which
    then computes the prompt loss only when asked: each weighting costs a gradient matmul)."""
    if not lm_head_chunk(model):
        return losses.sft_loss_terms(forward(model, params, tokens[:, :-1], rng), tokens[:, 1:], loss_mask)
    masks = {"response": loss_mask, "prompt": losses.prompt_target_mask(loss_mask)}
    names = ["response", "prompt"] if with_prompt else ["response"]
    weights = jnp.stack([losses.mean_weights(masks[name]) for name in names])
    sums = chunked_nll_sums(model, params, tokens, weights, rng)
    terms = {f"{name}_loss": total for name, total in zip(names, sums)}
    return {**terms, **{f"{name}_tokens": mask.astype(jnp.float32).sum() for name, mask in masks.items()}}


def pretrain_loss(model: gpt.GPT) -> LossFn:
    """Next-token cross-entropy on packed sequences: batch["tokens"] [B, T+1]."""

    def loss_fn(params, batch, rng):
        return next_token_loss(model, params, batch["tokens"], rng), {}

    return loss_fn


def make_pretrain_step(config, model, mesh, state_shardings):
    return make_update_step(pretrain_loss(model), config, mesh, state_shardings, sharding.batch_sharding(mesh))


def make_pretrain_eval_step(config, model, mesh, params_shardings):
    return make_eval_step(pretrain_loss(model), config, mesh, params_shardings, sharding.batch_sharding(mesh))


def sft_loss(model: gpt.GPT, prompt_loss_weight: float = 0.0, pretrain_mix: float = 0.0) -> LossFn:
    """Supervised fine-tuning: batch {"tokens" [B, T+1], "loss_mask" [B, T]} of prompt + response + EOS.

    The loss counts response tokens only, plus λ·(prompt LM loss) when prompt_loss_weight = λ > 0
    (GPT-1). With pretrain_mix = m > 0 the batch also holds "pretrain_tokens" [B_pt, T+1] of packed
    pretraining text and the loss is (1 − m)·SFT + m·LM (InstructGPT's pretraining mix, App. C).
    """

    def loss_fn(params, batch, rng):
        sft_rng, lm_rng = (None, None) if rng is None else jax.random.split(rng)
        t = sft_terms(model, params, batch["tokens"], batch["loss_mask"], sft_rng, with_prompt=bool(prompt_loss_weight))
        loss = t["response_loss"]  # + λ·prompt loss below: losses.sft_loss
        metrics = {"response_loss": t["response_loss"], "response_tokens": t["response_tokens"]}
        # pmap: the response loss is a mean over response tokens, the prompt loss over prompt tokens.
        weights, terms = {"loss": t["response_tokens"], "response_tokens": pmap.TOTAL}, {"response_loss": 1.0}
        if prompt_loss_weight:
            loss = loss + prompt_loss_weight * t["prompt_loss"]
            metrics["prompt_loss"], weights["prompt_loss"] = t["prompt_loss"], t["prompt_tokens"]
            terms["prompt_loss"] = prompt_loss_weight
        if pretrain_mix:
            lm = next_token_loss(model, params, batch["pretrain_tokens"], lm_rng)
            loss = (1.0 - pretrain_mix) * loss + pretrain_mix * lm
            metrics["pretrain_loss"], weights["pretrain_loss"] = lm, 1.0  # equal pretraining rows per device
            terms = {**{k: (1.0 - pretrain_mix) * c for k, c in terms.items()}, "pretrain_loss": pretrain_mix}
        return loss, {**metrics, pmap.WEIGHTS: weights, pmap.TERMS: terms}

    return loss_fn


def make_sft_step(config, model, mesh, state_shardings):
    loss_fn = sft_loss(model, config.sft.prompt_loss_weight, config.sft.pretrain_mix)
    return make_update_step(loss_fn, config, mesh, state_shardings, sharding.batch_sharding(mesh))


def make_sft_eval_step(config, model, mesh, params_shardings):
    """Validation loss on response tokens only (what SFT epoch selection compares)."""
    return make_eval_step(sft_loss(model), config, mesh, params_shardings, sharding.batch_sharding(mesh))


def rm_loss(model) -> LossFn:
    """Reward model: batch {"tokens" [B, K, T], "last_index", "response_start" [B, K], "num_responses" [B]},
    responses best first; all B·K sequences in one forward pass, the C(K,2) pairwise loss per prompt (eq. 1)."""
    from instructgpt_jax.models import heads

    def loss_fn(params, batch, rng):
        scores = heads.sequence_scores(model.apply, params, batch["tokens"], batch["last_index"],
                                       batch["response_start"], rng)
        n = batch["num_responses"]
        valid = jnp.arange(scores.shape[1])[None] < n[:, None]
        mean = (scores * valid).sum() / jnp.maximum(valid.sum(), 1)
        metrics = {"accuracy": losses.pairwise_accuracy(scores, n), "mean_score": mean}
        # pmap: the loss is a mean over prompts with a pair, the accuracy over pairs, the score over responses.
        metrics[pmap.WEIGHTS] = {"loss": (n >= 2).sum(), "accuracy": (n * (n - 1) // 2).sum(), "mean_score": valid.sum()}
        return losses.pairwise_ranking_loss(scores, n), metrics

    return loss_fn


def make_rm_step(config, model, mesh, state_shardings):
    return make_update_step(rm_loss(model), config, mesh, state_shardings, sharding.batch_sharding(mesh))


def make_rm_eval_step(config, model, mesh, params_shardings):
    return make_eval_step(rm_loss(model), config, mesh, params_shardings, sharding.batch_sharding(mesh))


def ppo_loss(policy_model, value_model, ppo_cfg, reuse_reference: bool = False) -> LossFn:
    """PPO on params {"policy", "value"} for a minibatch of a rollout (rl/rollout.Rollout fields) plus, for
    PPO-ptx, "pretrain_tokens" [B_ptx, T+1]:

        loss = clipped surrogate + c_v · clipped value loss − c_H · entropy + γ_ptx · LM loss (eq. 2)

    With ppo.baseline = "leave_one_out" there is no value term (the advantages do not use a value model).
    With `reuse_reference` a sft_loglik value model reads the minibatch's "ref_logprobs" instead of running its
    frozen copy (rl/rollout.RolloutSettings.reuse_reference).

    No dropout: the ratio π/π_old must compare the same function the rollout sampled from."""
    from instructgpt_jax.rl import rollout

    def loss_fn(params, batch, rng):
        del rng
        args = (batch["tokens"], batch["prompt_mask"], batch["response_mask"])
        mask = batch["response_mask"]
        logprobs, entropies = rollout.response_logprobs(policy_model, params["policy"], *args, ppo_cfg.temperature)
        policy_loss, metrics = losses.ppo_policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask,
                                                      ppo_cfg.clip)
        entropy = losses.masked_mean(entropies, mask)
        loss = policy_loss - ppo_cfg.entropy_coef * entropy
        metrics.update(policy_loss=policy_loss, entropy=entropy)
        # pmap: the PPO terms (and metrics) are means over response tokens, the ptx term over equal rows.
        metrics[pmap.WEIGHTS] = {"loss": mask.sum(), "ptx_loss": 1.0}
        metrics[pmap.TERMS] = {"policy_loss": 1.0, "entropy": -ppo_cfg.entropy_coef}
        if ppo_cfg.baseline == "value":  # leave_one_out: no value model in the advantages, none trained
            reference = batch["ref_logprobs"] if reuse_reference else None
            values = rollout.response_values(value_model, params["value"], *args, reference)
            value_loss, value_clip_fraction = losses.ppo_value_loss(values, batch["values"], batch["returns"], mask,
                                                                    ppo_cfg.value_clip)
            loss = loss + ppo_cfg.value_coef * value_loss
            metrics.update(value_loss=value_loss, value_clip_fraction=value_clip_fraction,
                           explained_variance=losses.explained_variance(values, batch["returns"], mask))
            metrics[pmap.TERMS]["value_loss"] = ppo_cfg.value_coef
        if ppo_cfg.ptx_coef:
            pretrain = batch["pretrain_tokens"]
            ptx_loss = next_token_loss(policy_model, params["policy"], pretrain, None)
            loss = loss + ppo_cfg.ptx_coef * ptx_loss
            metrics["ptx_loss"] = ptx_loss
            metrics[pmap.TERMS]["ptx_loss"] = ppo_cfg.ptx_coef
        return loss, metrics

    return loss_fn


def make_ppo_optimizer(config) -> optax.GradientTransformation:
    """Separate AdamW (and clipping) for the policy (config.optim) and the value model (config.value_optim);
    with the leave-one-out baseline the value model is unused and kept as loaded (no optimizer state)."""
    value = make_optimizer(config.value_optim) if config.ppo.baseline == "value" else optax.set_to_zero()
    return optax.multi_transform({"policy": make_optimizer(config.optim), "value": value},
                                 param_labels={"policy": "policy", "value": "value"})


def make_ppo_step(config, policy_model, value_model, mesh, state_shardings, reuse_reference: bool = False):
    """One PPO minibatch update; EMA of the policy weights (InstructGPT: 0.992) when ppo.ema_decay > 0."""
    ema = config.ppo.ema_decay or None
    loss_fn = ppo_loss(policy_model, value_model, config.ppo, reuse_reference)
    return make_update_step(loss_fn, config, mesh, state_shardings,
                            sharding.batch_sharding(mesh), ema_decay=ema, ema_of=lambda params: params["policy"],
                            tx=make_ppo_optimizer(config))
