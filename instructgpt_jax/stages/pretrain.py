"""Stage 1: pretraining with the next-token loss on a weighted mixture of corpora (GPT-3 §2.2)."""
from __future__ import annotations

import functools

import jax
import numpy as np

from instructgpt_jax.data import pipeline
from instructgpt_jax.models import gpt
from instructgpt_jax.stages import common
from instructgpt_jax.train import loop, sharding, steps
from instructgpt_jax.train.state import make_optimizer


def evaluate(eval_step, batches, n_batches, to_device, state) -> dict:
    """Mean held-out loss (and perplexity) over the first n_batches of a fixed validation stream."""
    it = batches()
    losses = [float(eval_step(state.params, to_device(next(it)))["loss"]) for _ in range(n_batches)]
    loss = float(np.mean(losses))
    return {"loss": loss, "perplexity": float(np.exp(loss))}


def run(config, workdir: str):
    if config.dry_run:
        model = steps.build_model(config)
        init = steps.init_state_fn(model, make_optimizer(config.optim), config.train.seq_len)
        tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len + 1), np.int32)
        return common.dry_run(config, init, lambda mesh, shardings: steps.make_pretrain_step(config, model, mesh, shardings),
                              {"tokens": tokens})
    workdir, mesh, writer, checkpointer = common.setup(config, workdir)
    tokenizer = common.load_tokenizer(config)
    model = steps.build_model(config)
    tx = make_optimizer(config.optim)
    rules = sharding.rules(config)
    init = steps.init_state_fn(model, tx, config.train.seq_len)
    rng = jax.random.PRNGKey(config.seed)
    abstract_state, state_shardings = sharding.abstract_init(init, mesh, rules, rng)
    state, data_state, start = loop.init_or_restore(
        checkpointer, init=lambda: sharding.sharded_init(init, mesh, rules, rng)[0], abstract=lambda: abstract_state,
        log=common.log)

    to_device = functools.partial(pipeline.to_global_batch, sharding=sharding.batch_sharding(mesh))
    batches = functools.partial(
        pipeline.lm_batches, config.data, tokenizer, config.train.seq_len, config.train.batch_size,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    train_batches = batches(split="train")
    if data_state:
        train_batches.set_state(data_state)
    eval_batches = functools.partial(batches, split="validation")

    train_step = steps.make_pretrain_step(config, model, mesh, state_shardings)
    eval_step = steps.make_pretrain_eval_step(config, model, mesh, state_shardings.params)
    cfg = gpt.GPTConfig.from_config(config.model)
    tokens = config.train.batch_size * config.train.seq_len
    state = loop.train_loop(
        config=config, state=state, train_step=train_step, batches=train_batches, to_device=to_device,
        checkpointer=checkpointer, writer=writer, start_step=start,
        eval_fn=functools.partial(evaluate, eval_step, eval_batches, config.train.eval_batches, to_device),
        tokens_per_batch=tokens, flops_per_batch=tokens * gpt.train_flops_per_token(cfg, config.train.seq_len),
    )
    final = evaluate(eval_step, eval_batches, config.train.eval_batches, to_device, state)
    common.log(f"pretrain done: held-out loss {final['loss']:.4f} (perplexity {final['perplexity']:.1f})")
    checkpointer.close()
    writer.close()
    return final
