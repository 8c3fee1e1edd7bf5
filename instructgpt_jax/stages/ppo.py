"""Stage 4: PPO against the reward model, with a per-token KL penalty to the SFT policy (Ouyang et al. 2022
§3.5, eq. 2, App. C.4), and PPO-ptx (γ·LM loss on pretraining data in the same update).

Each iteration: draw `ppo.batch_size` prompts -> sample responses with the KV-cache sampler -> score them
(policy, reference and value forward passes, RM score − bias; rl/rollout.score_rollout) -> `ppo.epochs`
passes of minibatch updates (train/steps.make_ppo_step). The policy starts from SFT (`init.policy`), the frozen
reference is SFT too (`init.reference`), the value model starts from the RM (`init.value`) and the RM
(`init.reward`) scores. β is fixed or adapted (Ziegler et al. 2019). Everything random is derived from
(seed, iteration), and the checkpoint holds the iteration, β and the ptx iterator, so a resumed run repeats
an uninterrupted one. At the end the policy (its EMA when `ppo.ema_decay` > 0) and the SFT policy are
compared on held-out prompts (EVAL_FILE).
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import configs, losses
from instructgpt_jax.data import pipeline, sources, tasks
from instructgpt_jax.errors import CheckpointError, ConfigError
from instructgpt_jax.eval import gold, perplexity
from instructgpt_jax.models import gpt, heads
from instructgpt_jax.rl import rollout, sampling
from instructgpt_jax.stages import common, sft
from instructgpt_jax.train import checkpoint, compiles, sharding, steps
from instructgpt_jax.train.state import FROZEN_KEY, TrainState

EVAL_FILE = "ppo_eval.json"
REWARDS = ("model", "gold")  # the reward model's score, or the task suite's gold score (an oracle upper bound)
BASELINES = ("value", "leave_one_out")  # GAE on the RM-initialised value model, or RLOO's (ppo.samples_per_prompt)
STEP_KEYS = ("tokens", "prompt_mask", "response_mask", "logprobs", "ref_logprobs", "values", "advantages", "returns")


def validate_ppo_config(config) -> None:
    p = config.ppo
    for key in ("policy", "reference", "reward", "value"):
        if not config.init[key]:
            raise ConfigError(f"init.{key}: PPO needs the earlier stages' workdirs; none given")
    if p.iterations < 1 or p.batch_size < 1 or p.minibatch_size < 1 or p.epochs < 1:
        raise ConfigError(f"ppo.iterations/batch_size/minibatch_size/epochs must be >= 1, got {p.iterations}/"
                          f"{p.batch_size}/{p.minibatch_size}/{p.epochs}")
    if p.batch_size % p.minibatch_size:
        raise ConfigError(f"ppo.batch_size={p.batch_size} is not divisible by ppo.minibatch_size={p.minibatch_size}")
    if p.prompt_len < 1 or p.max_new_tokens < 1:
        raise ConfigError(f"ppo.prompt_len={p.prompt_len} and ppo.max_new_tokens={p.max_new_tokens} must be >= 1")
    for key, max_len in (("model", config.model.max_len), ("reward_model", config.reward_model.max_len)):
        if p.prompt_len + p.max_new_tokens > max_len:
            raise ConfigError(f"ppo.prompt_len={p.prompt_len} + ppo.max_new_tokens={p.max_new_tokens} exceeds "
                              f"{key}.max_len={max_len}")
    if p.temperature <= 0 or not 0 < p.top_p <= 1:
        raise ConfigError(f"ppo.temperature={p.temperature} must be > 0 and ppo.top_p={p.top_p} in (0, 1]")
    if p.kl_coef < 0 or p.ptx_coef < 0 or not 0 <= p.ema_decay < 1:
        raise ConfigError(f"need ppo.kl_coef >= 0, ppo.ptx_coef >= 0, 0 <= ppo.ema_decay < 1; got "
                          f"{p.kl_coef}, {p.ptx_coef}, {p.ema_decay}")
    if p.adaptive_kl and (p.kl_target <= 0 or p.kl_horizon <= 0):
        raise ConfigError(f"ppo.adaptive_kl needs ppo.kl_target > 0 and ppo.kl_horizon > 0, got "
                          f"{p.kl_target}, {p.kl_horizon}")
    if p.baseline not in BASELINES:
        raise ConfigError(f"ppo.baseline={p.baseline!r}: expected one of {BASELINES}")
    k = p.samples_per_prompt
    if k < 1 or p.batch_size % k:
        raise ConfigError(f"ppo.samples_per_prompt={k} must be >= 1 and divide ppo.batch_size={p.batch_size}")
    if p.baseline == "leave_one_out" and (k < 2 or p.gamma != 1.0):
        raise ConfigError(f"ppo.baseline='leave_one_out' compares a prompt's samples' undiscounted returns: it needs "
                          f"ppo.samples_per_prompt >= 2 and ppo.gamma = 1, got {k} and {p.gamma}")
    if p.reward not in REWARDS:
        raise ConfigError(f"ppo.reward={p.reward!r}: expected one of {REWARDS}")
    if p.reward == "gold" and config.data.prompts.path:
        raise ConfigError(f"ppo.reward='gold' scores task-suite prompts only; data.prompts.path="
                          f"{config.data.prompts.path!r} has its own prompts (use ppo.reward='model')")
    if p.overlong_prompts not in ("truncate", "drop", "error"):
        raise ConfigError(f"ppo.overlong_prompts={p.overlong_prompts!r}: expected truncate, drop or error")
    data, fsdp, _ = configs.validate_mesh(config, jax.device_count())
    for key in ("minibatch_size", "ptx_batch_size"):
        if p[key] % (data * fsdp) and (key != "ptx_batch_size" or p.ptx_coef):
            raise ConfigError(f"ppo.{key}={p[key]} is not divisible by mesh.data·mesh.fsdp={data * fsdp}")


# ------------------------------------------------------------------------------ prompts


def default_prompts(config) -> str:
    """Task-suite train prompts written once to the data directory (the embedded default)."""
    n, seed = config.ppo.num_prompts, config.labeler.seed
    settings = dict(n=n, seed=seed, code=sft.tasks_code_digest())
    return sft.cached_jsonl(config.data, "prompts", settings, lambda path: tasks.write_prompts(path, n, "train", seed))


def encode_prompts(tokenizer, prompts, prompt_len: int, overlong: str, where: str) -> tuple[list[list[int]], list[int]]:
    """(token ids, index into prompts) of each kept prompt; one longer than prompt_len keeps its last tokens,
    is dropped, or is an error."""
    encoded, kept, dropped = [], [], 0
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ConfigError(f"{where}: prompt {i} is empty")
        if len(ids) > prompt_len:
            if overlong == "error":
                raise ConfigError(f"{where}: prompt {i} has {len(ids)} tokens > ppo.prompt_len={prompt_len} "
                                  "(set ppo.overlong_prompts=truncate|drop)")
            if overlong == "drop":
                dropped += 1
                continue
        encoded.append(ids[-prompt_len:])
        kept.append(i)
    if not encoded:
        raise ConfigError(f"{where}: no prompt fits ppo.prompt_len={prompt_len} ({dropped} dropped)")
    return encoded, kept


def iteration_prompts(pool_size: int, batch_size: int, seed: int, iteration: int) -> np.ndarray:
    """Indices of the prompts of one iteration: a function of (seed, iteration) only, so resume repeats them."""
    return np.random.default_rng([seed, iteration]).choice(pool_size, batch_size, replace=pool_size < batch_size)


def local_rows(array: np.ndarray) -> np.ndarray:
    """This process's share of a global batch (rows in process order)."""
    n = len(array) // jax.process_count()
    return array[jax.process_index() * n:(jax.process_index() + 1) * n]


def host_array(x) -> np.ndarray:
    """A global (batch-sharded) array on every host."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ------------------------------------------------------------------------------ state


def init_state_fn(policy_model, value_model, tx, seq_len: int, ema: bool):
    """rng -> TrainState over {"policy", "value"} (logically boxed, for sharding.abstract_init); EMA of the policy."""

    def init(rng):
        policy_rng, value_rng, state_rng = jax.random.split(rng, 3)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = {"policy": policy_model.init({"params": policy_rng}, tokens)["params"],
                  "value": value_model.init({"params": value_rng}, tokens)["params"]}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                          ema_params=jax.tree.map(jnp.copy, params["policy"]) if ema else None)

    return init


def value_model_for(config, workdir: str) -> heads.RewardModel:
    """The value model: the reward model's architecture (InstructGPT initialises it from the RM), its score
    form read from init.value's record; a dry run without a finished RM there assumes "final_token"."""
    path = sft.resolve_stage_path(config.init.value, workdir)
    if config.dry_run and not os.path.isfile(os.path.join(path, heads.REWARD_BIAS_FILE)):
        common.log(f"ppo: no reward-model record in {path}; the dry run assumes score='final_token'")
        return heads.RewardModel(gpt.GPTConfig.from_config(config.reward_model))
    try:
        return heads.reward_model_of(path, config.reward_model)
    except CheckpointError as e:
        raise CheckpointError(f"init.value: {e}") from e


def reward_config(config):
    """A config whose `model` is the reward model's (for heads.load_reward_model)."""
    rm_config = config.copy_and_resolve_references()
    rm_config.model = config.reward_model
    return rm_config


# ------------------------------------------------------------------------------ one iteration


def same_weights(a, b) -> bool:
    """Whether two param trees are equal, leaf for leaf (structure, shapes, dtypes and values)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return jax.tree.all(jax.tree.map(
        lambda x, y: (x.shape, x.dtype) == (y.shape, y.dtype) and bool(jnp.array_equal(x, y)), a, b))


def reuses_reference(temperature: float, ref_params, *scoring_params) -> bool:
    """Whether the likelihood term of a sft_loglik RM and value model can read the rollout's reference log-probs
    (rl/rollout.RolloutSettings.reuse_reference): their frozen copies hold exactly the reference's weights, and
    the rollout's log-probs are untempered (the term is the plain likelihood)."""
    copies = [params.get(FROZEN_KEY) for params in scoring_params]
    return temperature == 1.0 and all(c is not None and same_weights(c, ref_params) for c in copies)


class Trainer:
    """Holds the jitted functions and frozen models of a run; `iterate` advances the state by one iteration.
    `value_params`: the value model's params at the start (default: the RM's, as when comparing policies)."""

    def __init__(self, config, mesh, tokenizer, policy_model, value_model, state_shardings, ref_params, reward_fn,
                 value_params=None):
        p = self.ppo = config.ppo
        self.config, self.mesh, self.tokenizer = config, mesh, tokenizer
        self.ref_params, self.reward_fn = ref_params, reward_fn
        value_params = reward_fn.params if value_params is None else value_params
        self.reuse_reference = reuses_reference(p.temperature, ref_params, reward_fn.params, value_params)
        self.sampler = sampling.make_sampler(config, policy_model, mesh, max_new_tokens=p.max_new_tokens,
                                             top_k=p.top_k, params_shardings=state_shardings.params["policy"],
                                             eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        self.scorer = rollout.make_scorer(config, policy_model, value_model, mesh, state_shardings.params["policy"],
                                          state_shardings.params["value"], self.reuse_reference)
        self.step = steps.make_ppo_step(config, policy_model, value_model, mesh, state_shardings,
                                        self.reuse_reference)
        batch = sharding.batch_sharding(mesh)
        self.take = jax.jit(lambda rollout, idx: {k: getattr(rollout, k)[idx] for k in STEP_KEYS}, out_shardings=batch)
        self.to_device = functools.partial(pipeline.to_global_batch, sharding=batch)
        self.lm_nll = sharding.with_sharding_context(perplexity.make_nll_fn(policy_model), mesh, sharding.rules(config))

    def generate(self, params, prompt_ids, rng):
        tokens, mask = sampling.left_pad([list(x) for x in prompt_ids], self.ppo.prompt_len)
        device = self.to_device({"tokens": local_rows(tokens), "mask": local_rows(mask)})
        output = self.sampler(params, device["tokens"], device["mask"], rng, self.ppo.temperature, self.ppo.top_p)
        return output, device["mask"]

    def iterate(self, state, iteration: int, prompts, prompt_ids, kl_coef: float, ptx_batches):
        """One PPO iteration -> (state, metrics)."""
        p, seed = self.ppo, self.config.seed
        times = {"start": time.perf_counter()}
        k = p.samples_per_prompt  # each prompt's samples on consecutive rows
        index = np.repeat(iteration_prompts(len(prompt_ids), p.batch_size // k, seed, iteration), k)
        rng = jax.random.fold_in(jax.random.PRNGKey(seed + 1), iteration)
        output, prompt_mask = self.generate(state.params["policy"], [prompt_ids[i] for i in index], rng)
        jax.block_until_ready(output)
        times["generate"] = time.perf_counter()
        gold = self.gold_of([prompts[i] for i in index], output)
        external = None
        if p.reward == "gold":
            external = self.to_device({"scores": local_rows(gold.astype(np.float32))})["scores"]
        batch = self.scorer(state.params["policy"], state.params["value"], self.ref_params, self.reward_fn.params,
                            self.reward_fn.bias, kl_coef, output, prompt_mask, external)
        jax.block_until_ready(batch)
        times["score"] = time.perf_counter()
        update_metrics = []
        for epoch in range(p.epochs):
            order = np.random.default_rng([seed, iteration, epoch]).permutation(p.batch_size)
            for start in range(0, p.batch_size, p.minibatch_size):
                minibatch = self.take(batch, jnp.asarray(order[start:start + p.minibatch_size]))
                if p.ptx_coef:
                    minibatch["pretrain_tokens"] = self.to_device(next(ptx_batches))["tokens"]
                state, m = self.step(state, minibatch)
                update_metrics.append(m)
        update_metrics = jax.device_get(update_metrics)
        times["update"] = time.perf_counter()
        metrics = {k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]}
        metrics.update(self.rollout_metrics(batch, output, gold))
        elapsed = times["update"] - times["start"]
        metrics.update(kl_coef=kl_coef, time_generate=times["generate"] - times["start"],
                       time_score=times["score"] - times["generate"], time_update=times["update"] - times["score"],
                       episodes_per_s=p.batch_size / elapsed)
        return state, metrics

    def gold_of(self, prompts, output) -> np.ndarray | None:
        """Gold scores [B] of a rollout's responses (None for prompts outside the task suite)."""
        response, ended = host_array(output.response), host_array(output.ended)
        return gold_scores(prompts, [self.tokenizer.decode(r) for r in response], ended)

    def rollout_metrics(self, batch, output, gold) -> dict:
        scores, kl, lengths = host_array(batch.rm_scores), host_array(batch.kl), host_array(output.lengths)
        returns, mask = host_array(batch.returns), host_array(batch.response_mask) > 0
        metrics = {"rm_score": float(scores.mean()), "rm_score_std": float(scores.std()),
                   "kl": float(kl.sum(axis=-1).mean()), "response_length": float(lengths.mean()),
                   "ended": float(host_array(output.ended).mean()), "return_mean": float(returns[mask].mean())}
        if gold is not None:
            metrics["gold_score"] = float(gold.mean())
        return metrics


def gold_scores(prompts, responses, ended) -> np.ndarray | None:
    """Gold scores of task-suite prompts; None when a prompt is not from the task suite (user prompts)."""
    try:
        return gold.gold_scores(prompts, responses, ended)
    except ValueError:
        return None


def next_kl_coef(ppo_cfg, kl_coef: float, observed_kl: float) -> float:
    if not ppo_cfg.adaptive_kl:
        return kl_coef
    return float(losses.adaptive_kl_coef(kl_coef, observed_kl, ppo_cfg.kl_target, ppo_cfg.kl_horizon, ppo_cfg.batch_size))


# ------------------------------------------------------------------------------ final evaluation


def held_out_lm_loss(trainer: Trainer, params, n_batches: int) -> float:
    """Next-token loss per token on validation batches of the pretraining mixture (the alignment tax)."""
    config = trainer.config
    it = pipeline.lm_batches(config.data, trainer.tokenizer, config.train.seq_len, config.ppo.ptx_batch_size,
                             "validation", seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batches = (trainer.to_device(next(it)) for _ in range(n_batches))
    return perplexity.heldout_perplexity(trainer.lm_nll, params, batches)["loss"]


def sample_and_score(trainer: Trainer, params, prompt_ids, temperature: float, seed: int) -> dict:
    """Responses of the policy `params` to every prompt (in rollout-sized batches, the last padded), their
    RM scores (− bias) and sequence KL to the reference at the rollout temperature."""
    p = trainer.ppo
    out = {"texts": [], "ended": [], "rm": [], "kl": []}
    for start in range(0, len(prompt_ids), p.batch_size):
        chunk = list(prompt_ids[start:start + p.batch_size])
        chunk += [chunk[0]] * (p.batch_size - len(chunk))
        tokens, mask = sampling.left_pad(chunk, p.prompt_len)
        device = trainer.to_device({"tokens": local_rows(tokens), "mask": local_rows(mask)})
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), start)
        output = trainer.sampler(params, device["tokens"], device["mask"], rng, temperature, 1.0)
        batch = trainer.scorer(params, trainer.reward_fn.params, trainer.ref_params, trainer.reward_fn.params,
                               trainer.reward_fn.bias, 0.0, output, device["mask"])
        out["texts"] += [trainer.tokenizer.decode(r) for r in host_array(output.response)]
        out["ended"] += [bool(e) for e in host_array(output.ended)]
        out["rm"] += list(host_array(batch.rm_scores))
        out["kl"] += list(host_array(batch.kl).sum(axis=-1))
    return {k: v[:len(prompt_ids)] for k, v in out.items()}


def compare_policies(config, trainer: Trainer, policy_model, named_params: dict, prompts) -> tuple[dict, dict]:
    """Each policy on the same held-out prompts, sampled at ppo.temperature and greedy: gold score, RM score,
    KL to the reference, held-out pretraining loss, and gold/RM comparisons with the first policy (the
    baseline: win rate and paired difference with bootstrap CIs). Returns (results, samples)."""
    from instructgpt_jax.eval import stats

    p = config.ppo
    ids, _ = encode_prompts(trainer.tokenizer, prompts, p.prompt_len, "truncate", "evaluation prompts")
    results, samples = {"prompts": len(prompts)}, {}
    for name, params in named_params.items():
        row = {}
        for mode, temperature in (("sampled", p.temperature), ("greedy", 0.0)):
            s = samples[name, mode] = sample_and_score(trainer, params, ids, temperature, config.seed + 2)
            s["gold"] = gold.gold_scores(prompts, s["texts"], s["ended"])
            row[mode] = {"gold": stats.mean_ci(s["gold"]), "rm_score": stats.mean_ci(s["rm"]),
                         "kl_to_reference": stats.mean_ci(s["kl"]), "ended": float(np.mean(s["ended"])),
                         "gold_by_family": gold.mean_by_family(prompts, s["gold"])}
        row["pretrain_loss"] = held_out_lm_loss(trainer, params, p.eval_lm_batches)
        results[name] = row
    base = next(iter(named_params))
    for name in list(named_params)[1:]:
        for mode in ("sampled", "greedy"):
            ours, theirs = samples[name, mode], samples[base, mode]
            results[name][mode][f"vs_{base}"] = gold.policy_vs_baseline(
                prompts, (ours["texts"], ours["ended"]), (theirs["texts"], theirs["ended"]),
                policy_rm_scores=ours["rm"], baseline_rm_scores=theirs["rm"], seed=config.seed)
    return results, samples


# ------------------------------------------------------------------------------ the stage


def abstract_minibatch(config) -> dict:
    p, m = config.ppo, config.ppo.minibatch_size
    n, t = p.max_new_tokens, p.prompt_len + p.max_new_tokens
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)  # noqa: E731
    batch = {"tokens": jax.ShapeDtypeStruct((m, t), np.int32), "prompt_mask": jax.ShapeDtypeStruct((m, p.prompt_len), bool),
             **{k: f32(m, n) for k in STEP_KEYS[2:]}}
    if p.ptx_coef:
        batch["pretrain_tokens"] = jax.ShapeDtypeStruct((p.ptx_batch_size, config.train.seq_len + 1), np.int32)
    return batch


def run(config, workdir: str):
    validate_ppo_config(config)
    policy_model = steps.build_model(config)
    tx = steps.make_ppo_optimizer(config)
    seq_len = config.ppo.prompt_len + config.ppo.max_new_tokens
    if config.dry_run:
        value_model = value_model_for(config, workdir)
        init = init_state_fn(policy_model, value_model, tx, seq_len, ema=config.ppo.ema_decay > 0)
        return common.dry_run(config, init, lambda mesh, sh: steps.make_ppo_step(config, policy_model, value_model,
                                                                                  mesh, sh), abstract_minibatch(config))
    paths = {key: sft.require_checkpoint(sft.resolve_stage_path(config.init[key], workdir), f"init.{key}")
             for key in ("policy", "reference", "reward", "value")}
    reward_score = heads.read_record(paths["reward"])["score"]  # fail before any work if the RM has not finished
    value_model, value_bias = value_model_for(config, workdir), heads.read_bias(paths["value"])
    if reward_score != value_model.score:
        raise ConfigError(f"init.reward={config.init.reward!r} scores {reward_score!r} but init.value="
                          f"{config.init.value!r} has {value_model.score!r}: the value model takes the RM's form")
    init = init_state_fn(policy_model, value_model, tx, seq_len, ema=config.ppo.ema_decay > 0)
    if not config.data.prompts.path:
        config.data.prompts.path = default_prompts(config)
        common.log(f"prompts: embedded default {config.data.prompts.path}")
    workdir, mesh, writer, checkpointer = common.setup(config, workdir)
    tokenizer = common.load_tokenizer(config)
    built = sources.build_jsonl_source("prompts", config.data)
    prompts = [r["prompt"] for r in sources.read_examples(built, "train")]
    prompt_ids, kept = encode_prompts(tokenizer, prompts, config.ppo.prompt_len, config.ppo.overlong_prompts,
                                      f"data.prompts.path={config.data.prompts.path}")
    prompts = [prompts[i] for i in kept]  # texts aligned with their ids when overlong ones were dropped
    common.log(f"ppo: {len(prompts)} train prompts, {config.ppo.iterations} iterations x {config.ppo.batch_size} "
               f"episodes, β={config.ppo.kl_coef}{' (adaptive)' if config.ppo.adaptive_kl else ''}, "
               f"ptx γ={config.ppo.ptx_coef}")

    rules, rng = sharding.rules(config), jax.random.PRNGKey(config.seed)
    abstract_state, state_shardings = sharding.abstract_init(init, mesh, rules, rng)
    load = lambda key, part: checkpoint.load_params(paths[key], abstract_state.params[part])  # noqa: E731
    reward_fn = heads.load_reward_model(paths["reward"], reward_config(config), mesh)
    ref_params = load("reference", "policy")

    def fresh_state():
        state = sharding.sharded_init(init, mesh, rules, rng)[0]
        params = {"policy": load("policy", "policy"), "value": heads.fold_bias(load("value", "value"), value_bias)}
        common.log(f"ppo: policy from {paths['policy']}, value from {paths['value']}")
        ema = jax.tree.map(jnp.copy, params["policy"]) if state.ema_params is not None else None
        return state.replace(params=params, ema_params=ema)

    step = checkpointer.latest_step()
    if step is None:
        state, data_state = fresh_state(), {}
    else:
        state, data_state = checkpointer.restore(abstract_state)
        common.log(f"resuming from {checkpointer.directory}/{step}")
    start = int(data_state.get("iteration", 0))
    kl_coef = float(data_state.get("kl_coef", config.ppo.kl_coef))
    ptx_batches = None
    if config.ppo.ptx_coef:
        ptx_batches = pipeline.lm_batches(config.data, tokenizer, config.train.seq_len, config.ppo.ptx_batch_size,
                                          "train", seed=config.seed, process_index=jax.process_index(),
                                          process_count=jax.process_count())
        if data_state.get("ptx"):
            ptx_batches.set_state(data_state["ptx"])
    trainer = Trainer(config, mesh, tokenizer, policy_model, value_model, state_shardings, ref_params, reward_fn,
                      state.params["value"])
    if trainer.reuse_reference:
        common.log("ppo: the RM's and the value model's frozen SFT copies equal init.reference: their likelihood "
                   "term reads the rollout's reference log-probs")
    p = config.ppo
    for iteration in range(start, p.iterations):
        with compiles.count_compilations() as compiled:
            state, metrics = trainer.iterate(state, iteration, prompts, prompt_ids, kl_coef, ptx_batches)
        metrics["compilations"] = sum(compiled.values())  # 0 after the first iteration: fixed shapes
        kl_coef = next_kl_coef(p, kl_coef, metrics["kl"])
        done = iteration + 1
        writer.write(done, metrics, "train", echo=done % p.log_every == 0 or done == p.iterations)
        if metrics["nonfinite"] and config.optim.nonfinite == "stop":
            from instructgpt_jax.train.loop import NonFiniteError

            raise NonFiniteError(f"ppo: non-finite loss or gradient at iteration {done}; nothing was checkpointed")
        if done % p.checkpoint_every == 0 or done == p.iterations:
            data = {"iteration": done, "kl_coef": kl_coef, "ptx": ptx_batches.get_state() if ptx_batches else {}}
            checkpointer.save(done, state, data)
    checkpointer.wait()

    checkpointer.close()
    if not p.eval_prompts:  # the pipeline evaluates every policy together instead
        writer.close()
        return {"iterations": p.iterations, "final_kl_coef": kl_coef}
    final = state.ema_params if state.ema_params is not None else state.params["policy"]
    prompts = tasks.sample_prompts(p.eval_prompts, "test", config.seed)
    results, _ = compare_policies(config, trainer, policy_model, {"sft": ref_params, "ppo": final}, prompts)
    results.update(iterations=p.iterations, final_kl_coef=kl_coef, ptx_coef=p.ptx_coef,
                   evaluated="ema" if state.ema_params is not None else "policy")
    common.save_json(os.path.join(workdir, EVAL_FILE), results)
    writer.write(p.iterations, flat_eval_metrics(results), "eval", echo=False)
    for name in ("sft", "ppo"):
        s = results[name]["sampled"]
        common.log(f"ppo: {name}: gold {s['gold']['mean']:.3f} ± {s['gold']['ci95']:.3f} (greedy "
                   f"{results[name]['greedy']['gold']['mean']:.3f}), RM {s['rm_score']['mean']:+.3f}, KL to SFT "
                   f"{s['kl_to_reference']['mean']:.3f}, pretraining loss {results[name]['pretrain_loss']:.3f}")
    writer.close()
    return results


def flat_eval_metrics(results: dict) -> dict:
    out = {}
    for name in ("sft", "ppo"):
        for mode in ("sampled", "greedy"):
            out[f"{name}_{mode}_gold"] = results[name][mode]["gold"]["mean"]
            out[f"{name}_{mode}_rm_score"] = results[name][mode]["rm_score"]["mean"]
        out[f"{name}_pretrain_loss"] = results[name]["pretrain_loss"]
    return out
