"""Shared benchmark machinery: timing, a matmul peak bracket, compiled memory, tables, JSON.

Timing excludes compilation and warm-up, takes the median of repeats and waits with
`block_until_ready`. Machine speed drifts (up to ~40% within an hour on shared CPUs), so every
figure is bracketed by a jitted large-matmul throughput measured right before and after it, and
competing variants are timed interleaved (one call of each per round) so drift hits them alike.
Before each timed call the harness pauses (untimed) for a tenth of the previous call's time: the
OS reclaims the memory a big call released after it returns, and without the pause that work
lands on whatever is timed next (measured: +300-400 ms on a 0.45 s call after a 3 GB one).
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def compile_jitted(fn: Callable, *args):
    """Ahead-of-time compiled `jax.jit(fn)` for these arguments."""
    return jax.jit(fn).lower(*args).compile()


def temp_bytes(compiled) -> int | None:
    """Peak scratch memory XLA reserves for a compiled function (None if the backend won't say)."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


class _Settler:
    """Pauses before a timed call for a tenth of the previous call's duration (at most max_s)."""

    def __init__(self, max_s: float = 1.0):
        self.previous_s, self.max_s = 0.0, max_s

    def timed(self, fn: Callable, args: Sequence) -> float:
        time.sleep(min(self.max_s, 0.1 * self.previous_s))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        self.previous_s = time.perf_counter() - start
        return self.previous_s


def time_call(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> dict:
    """Median and min wall time of fn(*args) over `repeats` calls after `warmup` calls."""
    settler = _Settler()
    for _ in range(warmup):
        settler.timed(fn, args)
    times = [settler.timed(fn, args) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def time_interleaved(calls: dict[str, tuple[Callable, Sequence]], repeats: int = 5, warmup: int = 1) -> dict:
    """Like time_call for several named (fn, args), one call of each per round, so that drift
    during the measurement affects every variant alike. The order is shuffled every round (seeded),
    so no variant always runs right after the same neighbour: the call following one that
    released gigabytes pays for it (page faults on re-allocation, cold caches)."""
    settler = _Settler()
    for fn, args in calls.values():
        for _ in range(warmup):
            settler.timed(fn, args)
    names, shuffle = list(calls), random.Random(0).shuffle
    times = {name: [] for name in names}
    for _ in range(repeats):
        shuffle(names)
        for name in names:
            times[name].append(settler.timed(*calls[name]))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for name, t in times.items()}


_MATMUL_CACHE: dict = {}


def matmul_flops_per_s(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
    """Throughput of a jitted n x n x n matmul: the machine's current speed, for bracketing."""
    key = (n, jnp.dtype(dtype).name)
    if key not in _MATMUL_CACHE:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
        _MATMUL_CACHE[key] = (compile_jitted(jnp.matmul, a, a), a)
    fn, a = _MATMUL_CACHE[key]
    return 2.0 * n ** 3 / time_call(fn, a, a, repeats=repeats)["median_s"]


def bracketed(measure: Callable[[], list[dict]]) -> list[dict]:
    """Run `measure`, adding the matmul GFLOP/s measured right before and after to each row."""
    before = matmul_flops_per_s() / 1e9
    rows = measure()
    after = matmul_flops_per_s() / 1e9
    for row in rows:
        row.update(matmul_gflops_before=round(before, 1), matmul_gflops_after=round(after, 1))
    return rows


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "jax": jax.__version__, "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)), "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def print_table(rows: list[dict], columns: Sequence[str], title: str = "") -> None:
    """Fixed-width table of the given columns (missing entries print as '-')."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if title:
        print(f"\n== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def write_json(path: str, benchmark: str, rows: list[dict], extra: dict | None = None) -> None:
    """{"benchmark", "environment", "rows", ...extra} to `path` (directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"benchmark": benchmark, "environment": environment(), "rows": rows, **(extra or {})}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
