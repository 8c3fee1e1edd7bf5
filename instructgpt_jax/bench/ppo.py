"""PPO iterations: episodes/s and the generate / score / update split, through the stage's own Trainer.

For each --sizes entry: experiments/ppo.py at that size (variant ppo_ptx), with --batch episodes per
iteration, --minibatch per update and --epochs passes over the batch; policy, reference, value and
reward models are randomly initialised (speed does not depend on the weights) and EOS is never
sampled, so every response runs ppo.max_new_tokens steps: a fixed amount of work. --rm-score picks the
reward model's form; with final_token+sft_loglik (the tiny RM's) the RM's and value's frozen copies hold
the reference's weights, as after the pipeline's RM stage, so their term reads the reference log-probs.
The first iteration (compilation) is excluded; the median over --repeats iterations is reported,
bracketed by the matmul peak measured before and after. generate = KV-cache sampling; score = policy, reference, value and RM
forward passes + rewards + GAE; update = every PPO minibatch step (with the PPO-ptx pretraining batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import configs
from instructgpt_jax.bench import common
from instructgpt_jax.data import tasks
from instructgpt_jax.models import gpt, heads
from instructgpt_jax.stages import ppo
from instructgpt_jax.train import compiles, sharding, steps
from instructgpt_jax.train.state import FROZEN_KEY

COLUMNS = ("size", "params", "rm_score", "reuses_reference", "batch", "minibatch", "epochs", "prompt", "new",
           "episodes_per_s", "generate_s", "score_s", "update_s", "generate_share", "recompilations",
           "matmul_gflops_before", "matmul_gflops_after")
NO_EOS = -1


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default="tiny,mini", help="comma list of experiments/ppo.py sizes")
    parser.add_argument("--batch", type=int, default=64, help="episodes per iteration")
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1, help="PPO epochs per iteration (the tiny experiment's: 4)")
    parser.add_argument("--rm-score", default="final_token+sft_loglik", choices=heads.SCORES,
                        help="the reward (and value) model's form (default: the tiny RM's)")


def ppo_config(size: str, batch: int, minibatch: int, epochs: int = 1):
    c = configs.experiment_config("ppo", f"size={size},variant=ppo_ptx")
    c.ppo.update(batch_size=batch, minibatch_size=minibatch, ptx_batch_size=minibatch, epochs=epochs)
    return c


class RandomTokenizer:
    """What the Trainer needs from a tokenizer, for random token ids: the benchmark measures speed only."""

    eos_id, pad_id = NO_EOS, 0

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def with_frozen_copy(params, reference):
    """A sft_loglik model's params whose frozen copy holds `reference` (own buffers: steps donate the state)."""
    if FROZEN_KEY not in params:
        return params
    return {**params, FROZEN_KEY: jax.tree.map(jnp.copy, reference)}


def build_trainer(c, rm_score: str):
    mesh = sharding.make_mesh(c)
    policy_model = steps.build_model(c)
    value_model = heads.RewardModel(gpt.GPTConfig.from_config(c.reward_model), score=rm_score)
    init = ppo.init_state_fn(policy_model, value_model, steps.make_ppo_optimizer(c),
                             c.ppo.prompt_len + c.ppo.max_new_tokens, ema=c.ppo.ema_decay > 0)
    state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    other = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(1))[0]
    reference = other.params["policy"]
    state = state.replace(params={**state.params, "value": with_frozen_copy(state.params["value"], reference)})
    reward = heads.RewardFunction(model=value_model, params=with_frozen_copy(other.params["value"], reference),
                                  bias=0.0)
    trainer = ppo.Trainer(c, mesh, RandomTokenizer(), policy_model, value_model, shardings, reference, reward,
                          state.params["value"])
    return trainer, state, gpt.count_params(policy_model.cfg)


def random_ptx_batches(c, seed: int = 0):
    rng = np.random.default_rng(seed)
    while True:
        yield {"tokens": rng.integers(4, c.model.vocab_size, (c.ppo.ptx_batch_size, c.train.seq_len + 1), np.int32)}


def measure(args, size: str) -> list[dict]:
    c = ppo_config(size, args.batch, args.minibatch, args.epochs)
    trainer, state, n_params = build_trainer(c, args.rm_score)
    rng = np.random.default_rng(0)
    prompt_ids = [list(rng.integers(4, c.model.vocab_size, rng.integers(c.ppo.prompt_len // 2, c.ppo.prompt_len + 1)))
                  for _ in range(4 * args.batch)]
    prompts = tasks.sample_prompts(len(prompt_ids), "train", 0)  # only for the (here meaningless) gold metric
    ptx = random_ptx_batches(c)
    state, _ = trainer.iterate(state, 0, prompts, prompt_ids, c.ppo.kl_coef, ptx)  # compiles
    times = []
    with compiles.count_compilations() as compiled:
        for iteration in range(1, args.repeats + 1):
            state, metrics = trainer.iterate(state, iteration, prompts, prompt_ids, c.ppo.kl_coef, ptx)
            times.append(metrics)
    median = {k: float(np.median([m[k] for m in times])) for k in ("time_generate", "time_score", "time_update")}
    total = sum(median.values())
    return [{"size": size, "params": n_params, "rm_score": args.rm_score, "reuses_reference": trainer.reuse_reference,
             "batch": args.batch, "minibatch": args.minibatch, "epochs": args.epochs, "prompt": c.ppo.prompt_len,
             "new": c.ppo.max_new_tokens,
             "episodes_per_s": args.batch / total,
             "generate_s": median["time_generate"], "score_s": median["time_score"],
             "update_s": median["time_update"], "generate_share": median["time_generate"] / total,
             "recompilations": sum(compiled.values())}]


def run(args) -> list[dict]:
    rows = []
    for size in (s.strip() for s in args.sizes.split(",") if s.strip()):
        rows += common.bracketed(lambda: measure(args, size))
        print(f"  {size} done", flush=True)
    print(f"\nppo: experiments/ppo.py variant ppo_ptx with random weights, EOS never sampled; median of "
          f"{args.repeats} iterations after one warm-up; {common.environment()}")
    common.print_table(rows, COLUMNS, "ppo: one iteration = generate + score + update")
    return rows
