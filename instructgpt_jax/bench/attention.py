"""Attention forward+backward: plain XLA dense (all T^2 scores) vs block-sparse patterns.

For each T: wall time (median, interleaved with dense), compiled temp memory, and densities:
  tok_density  allowed (query, key) pairs / T^2  (what the pattern needs);
  blk_density  scored pairs / T^2 in the block layout (active blocks x block^2: what FLOPs scale with);
  sparse/dense median over rounds of sparse_time / dense_time, both timed in the same round
               (calls are interleaved, so a load change mid-run hits both sides of each ratio);
  vs_ideal     (sparse/dense) / blk_density: 1.0 = as efficient per score as dense XLA;
  vs_ideal_min the same from the fastest call of each, the figure least disturbed by other
               processes on a shared machine.
"""
from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax.bench import common
from instructgpt_jax.models import attention

SEQ_LENS = (512, 1024, 2048, 4096, 8192)
COLUMNS = ("T", "pattern", "impl", "tok_density", "blk_density", "ms", "dense_ms", "sparse/dense",
           "vs_ideal", "vs_ideal_min", "temp_MiB", "dense_temp_MiB", "matmul_gflops_before", "matmul_gflops_after")


def add_arguments(parser) -> None:
    parser.add_argument("--patterns", default="local,strided_union,fixed_union,dense",
                        help="comma list of attention.PATTERNS run block-sparse")
    parser.add_argument("--min-seq", type=int, default=SEQ_LENS[0], help="smallest sequence length to run")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    defaults = attention.default_config()
    for key in ("block_size", "local_window", "stride", "fixed_c"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=defaults[key])


def attention_config(args, implementation: str):
    cfg = attention.default_config()
    for key in ("block_size", "local_window", "stride", "fixed_c"):
        cfg[key] = getattr(args, key)
    cfg.implementation = implementation
    return cfg


def token_density(pattern: str, params, T: int) -> float:
    """Allowed pairs / T^2, counted in row chunks (the T x T mask is never held at once)."""
    allowed, keys = 0, np.arange(T)
    for group in attention.head_groups(pattern):
        for start in range(0, T, 512):
            rows = np.arange(start, min(T, start + 512))
            allowed += int(np.asarray(attention.token_mask(group, rows, keys, params)).sum())
    return allowed / (T * T * len(attention.head_groups(pattern)))


def block_density(pattern: str, params, T: int, block: int) -> float:
    groups = attention.head_groups(pattern)
    active = sum(p.active_blocks for g in groups for p in attention.block_plans(g, params, T, block))
    return active * block * block / (T * T * len(groups))


def fwd_bwd(attend_fn):
    """(q, k, v, cotangent) -> (dq, dk, dv): one forward and one backward pass."""
    def run(q, k, v, cotangent):
        return jax.grad(lambda q, k, v: jnp.sum(attend_fn(q, k, v) * cotangent), argnums=(0, 1, 2))(q, k, v)
    return run


def measure_seq_len(args, T: int, patterns) -> list[dict]:
    keys = jax.random.split(jax.random.PRNGKey(T), 4)
    shape = (args.batch, T, args.heads, args.head_dim)
    inputs = [jax.random.normal(key, shape, jnp.float32) for key in keys]
    cfg = attention_config(args, "block_sparse")
    params = attention.PatternParams.of(cfg)
    compiled = {"xla_dense": common.compile_jitted(fwd_bwd(attention.xla_dense_attention), *inputs)}
    for pattern in patterns:
        attend_fn = lambda q, k, v, p=pattern: attention.attend(q, k, v, pattern=p, attention_cfg=cfg)
        compiled[pattern] = common.compile_jitted(fwd_bwd(attend_fn), *inputs)
    timings = common.time_interleaved({name: (fn, inputs) for name, fn in compiled.items()}, args.repeats)
    dense_s, dense_min_s = timings["xla_dense"]["median_s"], timings["xla_dense"]["min_s"]
    dense_mib = common.temp_bytes(compiled["xla_dense"]) / 2**20
    rows = [{"T": T, "pattern": "dense", "impl": "xla", "tok_density": token_density("dense", params, T),
             "blk_density": 1.0, "ms": 1e3 * dense_s, "dense_ms": 1e3 * dense_s, "sparse/dense": 1.0,
             "vs_ideal": 1.0, "vs_ideal_min": 1.0, "temp_MiB": dense_mib, "dense_temp_MiB": dense_mib,
             "times_ms": [1e3 * t for t in timings["xla_dense"]["times_s"]]}]
    for pattern in patterns:
        seconds, density = timings[pattern]["median_s"], block_density(pattern, params, T, cfg.block_size)
        paired = statistics.median(s / d for s, d in zip(timings[pattern]["times_s"], timings["xla_dense"]["times_s"]))
        rows.append({"T": T, "pattern": pattern, "impl": "block_sparse",
                     "tok_density": token_density(pattern, params, T), "blk_density": density,
                     "ms": 1e3 * seconds, "dense_ms": 1e3 * dense_s, "sparse/dense": paired,
                     "vs_ideal": paired / density,
                     "vs_ideal_min": timings[pattern]["min_s"] / (density * dense_min_s),
                     "temp_MiB": common.temp_bytes(compiled[pattern]) / 2**20, "dense_temp_MiB": dense_mib,
                     "times_ms": [1e3 * t for t in timings[pattern]["times_s"]]})
    return rows


def run(args) -> list[dict]:
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    rows = []
    for T in (t for t in SEQ_LENS if args.min_seq <= t <= args.max_seq):
        cfg = attention_config(args, "block_sparse")
        cfg.layers = ",".join(patterns)
        attention.validate(cfg, T, args.heads)
        rows += common.bracketed(lambda: measure_seq_len(args, T, patterns))
        print(f"  T={T} done", flush=True)
    print(f"\nattention fwd+bwd, batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
          f"block {args.block_size}, local_window {args.local_window}, stride {args.stride}, "
          f"fixed_c {args.fixed_c}; {common.environment()}")
    common.print_table(rows, COLUMNS, "attention: dense XLA vs block-sparse")
    return rows
