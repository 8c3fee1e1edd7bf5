"""One generic training loop for every gradient stage: progress, metrics, eval and checkpoint cadence,
the non-finite guard, and automatic resume."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from instructgpt_jax.errors import UserError
from instructgpt_jax.train import compiles
from instructgpt_jax.train.checkpoint import Checkpointer
from instructgpt_jax.train.metrics import MetricWriter


class NonFiniteError(UserError):
    """A NaN/Inf loss or gradient with optim.nonfinite == 'stop', or a non-finite state about to be saved."""


def init_or_restore(checkpointer: Checkpointer, init: Callable[[], Any], abstract: Callable[[], Any], log=print):
    """Restores the newest readable checkpoint of this workdir if there is one, else initialises.

    Returns (state, data_state, start_step); data_state is the saved data-iterator position or None.
    """
    if checkpointer.latest_step() is None:
        return init(), None, 0
    state, data_state, step = checkpointer.restore_latest(abstract(), log=log)
    log(f"resuming from {checkpointer.directory}/{step}")
    return state, data_state or None, int(step)


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
    """Whether every floating-point leaf of tree (params, optimizer moments, EMA) is finite."""
    return bool(_all_finite(tree))


def train_loop(
    *,
    config,
    state: Any,
    train_step: Callable,
    batches: Iterator,
    to_device: Callable[[Any], Any],
    checkpointer: Checkpointer,
    writer: MetricWriter,
    start_step: int = 0,
    eval_fn: Callable[[Any], dict] | None = None,
    tokens_per_batch: int = 0,
    flops_per_batch: float = 0.0,
) -> Any:
    """Runs steps start_step..config.train.steps-1. `batches` may have get_state() (grain), saved with the state."""
    t = config.train
    total = t.steps
    data_state = lambda: batches.get_state() if hasattr(batches, "get_state") else {}  # noqa: E731
    bar = tqdm(total=total, initial=start_step, desc=config.stage, disable=not t.progress_bar or jax.process_index() != 0,
               dynamic_ncols=True, leave=False)
    stop = config.optim.nonfinite == "stop"
    nonfinite = jnp.zeros((), jnp.float32)  # skipped updates this run, summed on device (no sync per step)
    last_checked = start_step

    def check_nonfinite(done: int, loss) -> float:
        """Skipped updates so far; in stop mode the first one ends the run before anything else is saved."""
        count = float(nonfinite)
        if count and stop:
            raise NonFiniteError(
                f"non-finite loss or gradient between steps {last_checked} and {done} (latest loss={loss}); those "
                f"updates were skipped and no checkpoint after step {last_checked} was written "
                f"(optim.nonfinite='stop'). Lower optim.lr, or set optim.nonfinite=skip to skip such updates")
        return count

    window_start, window_steps, window_compiles = time.perf_counter(), 0, 0
    step = start_step
    compiled = contextlib.ExitStack()
    counts = compiled.enter_context(compiles.count_compilations())  # the step's (re)compilations only
    try:
        for step in range(start_step, total):
            before = sum(counts.values())
            state, metrics = train_step(state, to_device(next(batches)))
            window_compiles += sum(counts.values()) - before
            if "nonfinite" in metrics:
                nonfinite = nonfinite + metrics["nonfinite"]
            window_steps += 1
            bar.update(1)
            done = step + 1
            if done % t.log_every == 0 or done == total:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                nonfinite_total = check_nonfinite(done, float(np.asarray(metrics["loss"])))
                last_checked = done
                metrics = {**metrics, "nonfinite_total": nonfinite_total, "steps_per_s": window_steps / elapsed,
                           "compilations": window_compiles}
                if tokens_per_batch:
                    metrics["tokens_per_s"] = tokens_per_batch * window_steps / elapsed
                if flops_per_batch:
                    metrics["flops_per_s"] = flops_per_batch * window_steps / elapsed
                writer.write(done, metrics, "train", echo=not t.progress_bar)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
                window_start, window_steps, window_compiles = time.perf_counter(), 0, 0
            if eval_fn is not None and (done % t.eval_every == 0 or done == total):
                writer.write(done, eval_fn(state), "eval", echo=True)
                window_start, window_steps = time.perf_counter(), 0
            if done % t.checkpoint_every == 0 or done == total:
                check_nonfinite(done, "see metrics.jsonl")
                last_checked = done
                if not all_finite(state):
                    raise NonFiniteError(
                        f"the train state has NaN/Inf values at step {done}; it was not checkpointed (the latest "
                        f"checkpoint in {checkpointer.directory} is intact). Lower optim.lr, or enable optim.grad_clip")
                checkpointer.save(done, state, data_state())
    except BaseException:
        bar.close()
        checkpointer.abandon()  # let an async save in flight finish (or fail) before the error propagates
        raise
    finally:
        compiled.close()
    bar.close()
    checkpointer.wait()
    return state
