"""Decoding: KV-cache sampling vs full recomputation, the prefill/decode split, and a batch sweep.

Model `--size` (default `mini`: 6 layers, d_model 512, 8 heads x 64, vocab 8192), float32, random
weights. Prompts of random lengths in [P/2, P] are left-padded to P = --prompt-len; --new-tokens are
sampled at temperature 1 with EOS disabled, so every sequence runs every step (a fixed amount of work).
  kv_cache   rl.sampling.sample: one prefill over the prompt, then one token per step from the cache;
  recompute  rl.sampling.full_recompute_sample: every step re-runs the model over the whole
             [B, P+N] buffer (fixed shapes), the baseline (only at --compare-batch: it is slow).
prefill_ms is `sample` with one new token (prompt pass + first draw); decode_ms is the rest per step.
Both functions are compiled ahead of time; the cache path takes the median of --repeats calls after a
warm-up call, interleaved with its prefill; the recompute baseline takes --recompute-repeats calls
(each is already new_tokens full forward passes), with no warm-up call beyond ahead-of-time compilation.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import configs
from instructgpt_jax.bench import common
from instructgpt_jax.models import gpt
from instructgpt_jax.rl import sampling

COLUMNS = ("impl", "batch", "prompt", "new", "total_s", "new_tok_per_s", "prefill_ms", "decode_ms",
           "speedup", "matmul_gflops_before", "matmul_gflops_after")
NO_EOS = -1  # never sampled: every sequence generates all new tokens


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="mini", help="configs.model_config size")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,4,16,64", help="comma list of batch sizes for the cache sampler")
    parser.add_argument("--compare-batch", type=int, default=16, help="batch at which recompute is also timed")
    parser.add_argument("--recompute-repeats", type=int, default=1)


def build_model(size: str):
    model = gpt.GPT(gpt.GPTConfig.from_config(configs.model_config(size)))
    init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]))
    return model, init(jax.random.PRNGKey(0))


def random_prompts(batch: int, length: int, vocab: int, seed: int):
    rs = np.random.RandomState(seed)
    prompts = [rs.randint(4, vocab, size=rs.randint(length // 2, length + 1)) for _ in range(batch)]
    return sampling.left_pad(prompts, length)


def compiled_samplers(model, args, inputs, with_recompute: bool) -> dict:
    new = args.new_tokens
    fns = {"kv_cache": functools.partial(sampling.sample, model, max_new_tokens=new, eos_id=NO_EOS),
           "prefill": functools.partial(sampling.sample, model, max_new_tokens=1, eos_id=NO_EOS)}
    if with_recompute:
        fns["recompute"] = lambda params, tokens, mask, rng, temperature, top_p: sampling.full_recompute_sample(
            model, params, tokens, mask, rng, temperature, max_new_tokens=new, eos_id=NO_EOS)
    return {name: common.compile_jitted(fn, *inputs) for name, fn in fns.items()}


def measure_batch(args, model, params, batch: int, with_recompute: bool) -> list[dict]:
    tokens, mask = random_prompts(batch, args.prompt_len, model.cfg.vocab_size, seed=batch)
    inputs = (params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(1), jnp.float32(1.0), jnp.float32(1.0))
    fns = compiled_samplers(model, args, inputs, with_recompute)
    cache_fns = {name: (fns[name], inputs) for name in ("kv_cache", "prefill")}
    timings = common.time_interleaved(cache_fns, repeats=args.repeats)
    total_s, prefill_s = timings["kv_cache"]["median_s"], timings["prefill"]["median_s"]
    new = args.new_tokens
    shape = {"batch": batch, "prompt": args.prompt_len, "new": new}
    rows = [{"impl": "kv_cache", **shape, "total_s": total_s, "new_tok_per_s": batch * new / total_s,
             "prefill_ms": 1e3 * prefill_s, "decode_ms": 1e3 * (total_s - prefill_s) / max(new - 1, 1)}]
    if with_recompute:
        recompute_s = common.time_call(fns["recompute"], *inputs, repeats=args.recompute_repeats, warmup=0)["median_s"]
        rows[0]["speedup"] = recompute_s / total_s
        rows.append({"impl": "recompute", **shape, "total_s": recompute_s, "new_tok_per_s": batch * new / recompute_s,
                     "decode_ms": 1e3 * recompute_s / new, "speedup": 1.0})
    return rows


def run(args) -> list[dict]:
    model, params = build_model(args.size)
    sampling.check_fits(model, args.prompt_len, args.new_tokens)
    rows = []
    for batch in (int(b) for b in args.batches.split(",") if b.strip()):
        rows += common.bracketed(lambda: measure_batch(args, model, params, batch, batch == args.compare_batch))
        print(f"  batch={batch} done", flush=True)
    cfg = model.cfg
    print(f"\ndecode: {args.size} ({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads}x{cfg.d_head} heads, "
          f"vocab {cfg.vocab_size}, {cfg.dtype}), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"temperature 1; decode_ms per step for the whole batch; {common.environment()}")
    common.print_table(rows, COLUMNS, "decode: KV cache vs full recompute")
    return rows
