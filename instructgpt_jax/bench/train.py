"""train: tokens/s, achieved FLOP/s and utilisation of the pretraining step.

FLOPs per token follow PaLM (Chowdhery et al. 2022, App. B): 6·N + 12·n_layers·d_attn·T, with N the
parameters that take part in matmuls (tied unembedding once). Utilisation = achieved FLOP/s ÷ the
same run's jitted matmul throughput in the same dtype, measured right before and right after; MFU
is also reported against the datasheet peak when the device is a known GPU/TPU.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from instructgpt_jax import configs
from instructgpt_jax.bench import common
from instructgpt_jax.models import attention, gpt
from instructgpt_jax.train import sharding, steps
from instructgpt_jax.train.state import make_optimizer

# Dense bf16 peak FLOP/s per chip from vendor datasheets (no sparsity).
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
                  "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}

# The acceptance shape of the perf issue: 8 layers, d_model 512, vocab 8192, T=512, batch 8, float32.
DEFAULT_SHAPE = dict(n_layers=8, d_model=512, n_heads=8, d_head=64, vocab_size=8192, max_len=512)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def chunk_list(text: str) -> list[int]:
    """'0,1024' -> [0, 1024] (each >= 0)."""
    try:
        return [non_negative_int(item) for item in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}") from e


def reference_modes(text: str) -> list[str]:
    from instructgpt_jax.bench import torch_reference

    modes = [m for m in text.split(",") if m]
    unknown = [m for m in modes if m not in torch_reference.MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown PyTorch mode(s) {unknown}; choose from {torch_reference.MODES}")
    return modes


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="", help="a configs size name instead of the default 8L/512 shape")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="", help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--matmul-n", type=int, default=2048, help="side of the bracketing matmul")
    parser.add_argument("--attention", default="auto", choices=attention.IMPLEMENTATIONS,
                        help="model.attention.implementation (auto picks per backend)")
    parser.add_argument("--profile", default="", help="also trace one more step with jax.profiler into this "
                        "directory (open it in TensorBoard's profile plugin or Perfetto)")
    parser.add_argument("--block", type=non_negative_int, default=0, help="model.attention.block_size (0: the config's)")
    parser.add_argument("--lm-head-chunk", type=chunk_list, default=None,
                        help="model.lm_head_chunk: tokens per chunk of the LM head + cross-entropy, 0 = full logits "
                        "(default: the config's); a list (0,1024) times each, interleaved in one process")
    parser.add_argument("--reference", type=reference_modes, default=[],
                        help="also time the same model written in PyTorch, interleaved with this step: 'eager', "
                        "'compile' or both ('eager,compile'); needs torch (bench/torch_reference.py)")


def bench_config(args):
    c = configs.base_config("pretrain", args.size or "test")
    if not args.size:
        c.model.update(DEFAULT_SHAPE)
        c.model.d_ff = 4 * c.model.d_model
    c.model.max_len = max(c.model.max_len, args.seq)
    c.train.seq_len, c.train.batch_size = args.seq, args.batch
    c.model.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    c.model.remat = args.remat
    c.model.attention.implementation = args.attention
    default_block = c.model.attention.block_size if args.size else attention.default_config().block_size
    c.model.attention.block_size = min(args.block or default_block, args.seq)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    attention.validate(c.model.attention, args.seq, c.model.n_heads)
    return c


def datasheet_peak(device_kind: str) -> float | None:
    return next((peak for name, peak in DATASHEET_PEAK.items() if name.lower() in device_kind.lower()), None)


def pretrain_stepper(c):
    """A no-argument callable running one pretraining step of config c on a random batch (its state kept),
    and the step's compiled scratch memory in bytes."""
    mesh = sharding.make_mesh(c, jax.devices()[:1])
    model = steps.build_model(c)
    init = steps.init_state_fn(model, make_optimizer(c.optim), c.train.seq_len)
    state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
    step = steps.make_pretrain_step(c, model, mesh, shardings)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (c.train.batch_size, c.train.seq_len + 1), 0, c.model.vocab_size)
    batch = {"tokens": tokens}
    holder = {"state": state}
    with sharding.sharding_context(mesh, sharding.rules(c)):
        scratch = common.temp_bytes(step.__wrapped__.lower(state, batch).compile())

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    return one_step, scratch


def run(args) -> list[dict]:
    c = bench_config(args)
    cfg = gpt.GPTConfig.from_config(c.model)  # the FLOP count and the PyTorch reference (lm_head_chunk unused)
    if args.reference:
        from instructgpt_jax.bench import torch_reference

        torch_reference.require_matching(cfg)  # both fail before compiling anything
        torch_reference.import_torch()
    chunks = list(dict.fromkeys(args.lm_head_chunk or [c.model.lm_head_chunk]))  # one row per distinct value
    variants, scratch = {}, {}
    for chunk in chunks:
        c.model.lm_head_chunk = chunk
        variants[("jax", chunk)], scratch[("jax", chunk)] = pretrain_stepper(c)
    if args.reference:
        tokens = np.random.default_rng(1).integers(0, c.model.vocab_size, (c.train.batch_size, c.train.seq_len + 1))
        for mode in args.reference:
            variants[(f"pytorch-{mode}", None)] = torch_reference.make_step(cfg, c.optim, tokens, mode)

    dtype = jax.numpy.dtype(c.model.dtype)
    before = common.matmul_flops_per_s(args.matmul_n, dtype=dtype)
    torch_before = torch_reference.matmul_flops_per_s(args.matmul_n) if args.reference else None
    timings = common.time_interleaved({key: (one_step, ()) for key, one_step in variants.items()},
                                      repeats=args.repeats, warmup=2)
    torch_after = torch_reference.matmul_flops_per_s(args.matmul_n) if args.reference else None
    after = common.matmul_flops_per_s(args.matmul_n, dtype=dtype)
    if args.profile:  # outside the timed calls: tracing slows the step
        with jax.profiler.trace(args.profile):
            jax.block_until_ready(variants[("jax", chunks[0])]())

    flops = c.train.batch_size * c.train.seq_len * gpt.train_flops_per_token(cfg, c.train.seq_len)
    peak_kind = datasheet_peak(getattr(jax.devices()[0], "device_kind", ""))
    own_peak = {"jax": (before, after), **{f"pytorch-{m}": (torch_before, torch_after) for m in args.reference}}
    rows = []
    for (framework, chunk), timing in timings.items():
        achieved = flops / timing["median_s"]
        framework_peak, scratch_bytes = np.mean(own_peak[framework]), scratch.get((framework, chunk))
        rows.append({
            "framework": framework if framework != "jax" else f"jax {jax.__version__}",
            "model": c.model.size if args.size else "8L-512", "params_M": gpt.count_params(cfg) / 1e6,
            "batch": c.train.batch_size, "seq": c.train.seq_len, "dtype": c.model.dtype, "remat": c.model.remat,
            "attention": c.model.attention.implementation if framework == "jax" else "sdpa",
            "block": c.model.attention.block_size if framework == "jax" else None,
            "lm_head_chunk": chunk, "step_ms": 1e3 * timing["median_s"],
            "tokens_per_s": c.train.batch_size * c.train.seq_len / timing["median_s"],
            "achieved_gflops": achieved / 1e9,
            "matmul_gflops_before": before / 1e9, "matmul_gflops_after": after / 1e9,
            "utilisation": achieved / np.mean([before, after]),
            # against the same framework's own matmul: how the PyTorch figure of 0.7-0.8 is meant
            "own_matmul_gflops": framework_peak / 1e9, "own_utilisation": achieved / framework_peak,
            "mfu": achieved / peak_kind if peak_kind else None,
            "scratch_MB": None if scratch_bytes is None else scratch_bytes / 2**20,
            "times_ms": [round(1e3 * t, 1) for t in timing["times_s"]],  # JSON only: the spread of the median
        })
    hidden = {"times_ms"} | (set() if args.reference else {"framework", "own_matmul_gflops", "own_utilisation"})
    columns = [k for k in rows[0] if k not in hidden]
    common.print_table(rows, columns, title="train step (utilisation = achieved / bracketing matmul)")
    return rows
