"""Counting XLA compilations: a step function that recompiles after its first call is a silent slowdown
(a new shape, a weakly typed Python scalar, a changed static argument). The loops log the count per
logging window and the tests assert it is zero after warm-up."""
from __future__ import annotations

import collections
import contextlib

import jax

# Emitted once per lowering of a jitted function to MLIR: a new compilation, whether or not the persistent
# compilation cache then supplies the executable.
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def count_compilations():
    """Yields a Counter of function name -> lowerings while the block runs."""
    counts: collections.Counter = collections.Counter()

    def listener(event: str, duration_secs: float, **kwargs) -> None:
        del duration_secs
        if event == LOWERING_EVENT:
            counts[str(kwargs.get("fun_name", "?"))] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
