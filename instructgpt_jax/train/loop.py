"""One generic training loop for every gradient stage: progress, metrics, eval and checkpoint cadence,
the non-finite guard, and automatic resume."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from instructgpt_jax.errors import UserError
from instructgpt_jax.train.checkpoint import Checkpointer
from instructgpt_jax.train.metrics import MetricWriter


class NonFiniteError(UserError):
    """Raised when optim.nonfinite == 'stop' and a loss or gradient is NaN/Inf."""


def init_or_restore(checkpointer: Checkpointer, init: Callable[[], Any], abstract: Callable[[], Any], log=print):
    """Restores the latest checkpoint of this workdir if there is one, else initialises.

    Returns (state, data_state, start_step); data_state is the saved data-iterator position or None.
    """
    step = checkpointer.latest_step()
    if step is None:
        return init(), None, 0
    state, data_state = checkpointer.restore(abstract())
    log(f"resuming from {checkpointer.directory}/{step}")
    return state, data_state or None, int(step)


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
    nonfinite_total = 0.0
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    for step in range(start_step, total):
        state, metrics = train_step(state, to_device(next(batches)))
        window_steps += 1
        bar.update(1)
        done = step + 1
        if done % t.log_every == 0 or done == total:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - window_start
            nonfinite_total += float(np.asarray(metrics.get("nonfinite", 0.0)))
            if nonfinite_total and config.optim.nonfinite == "stop":
                bar.close()
                raise NonFiniteError(
                    f"non-finite loss or gradient by step {done} (loss={float(metrics['loss'])}); the update was skipped and "
                    f"nothing was checkpointed. Lower optim.lr or set optim.nonfinite=skip to skip such updates.")
            metrics = {**metrics, "nonfinite_total": nonfinite_total, "steps_per_s": window_steps / elapsed}
            if tokens_per_batch:
                metrics["tokens_per_s"] = tokens_per_batch * window_steps / elapsed
            if flops_per_batch:
                metrics["flops_per_s"] = flops_per_batch * window_steps / elapsed
            writer.write(done, metrics, "train", echo=not t.progress_bar)
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            window_start, window_steps = time.perf_counter(), 0
        if eval_fn is not None and (done % t.eval_every == 0 or done == total):
            writer.write(done, eval_fn(state), "eval", echo=True)
            window_start, window_steps = time.perf_counter(), 0
        if done % t.checkpoint_every == 0 or done == total:
            checkpointer.save(done, state, data_state())
    bar.close()
    checkpointer.wait()
    return state
