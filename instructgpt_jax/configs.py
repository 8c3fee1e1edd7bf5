"""Config building blocks shared by the experiment files, and validation of a whole config.

Experiment files (`experiments/*.py`) compose these into one `ml_collections.ConfigDict` per
stage; every value can be overridden from the command line (`--config.optim.lr=3e-4`).
"""
from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from instructgpt_jax.errors import ConfigError

# GPT-3 model sizes (Brown et al. 2020, Table 2.1): layers, d_model, heads, d_head, batch size in
# tokens, learning rate; context 2048 and the GPT-2 BPE vocabulary (50257) for all of them.
# Two rows are not self-consistent and are resolved here:
#   XL (1.3B): 24 heads x 128 = 3072 != d_model 2048, and 3072-wide attention gives 1.52B params.
#     We keep d_model 2048 and d_head 128 and use 16 heads (attention width = d_model): 1.32B.
#   13B: d_model 5140 is not divisible by 40 heads (nor by 8-way tensor parallelism); 40 x 128 = 5120.
#     We read 5140 as a typo for 5120 (what later replications, e.g. OPT-13B, use): 12.85B.
# The table's sizes are rounded labels; the computed counts land within 2% (see tests/test_model.py).
GPT3_SIZES = {
    #  name      nominal   L   d_model heads d_head tokens/batch  lr
    "small":   (125e6,   12,   768,   12,   64,   0.5e6,  6.0e-4),
    "medium":  (350e6,   24,  1024,   16,   64,   0.5e6,  3.0e-4),
    "large":   (760e6,   24,  1536,   16,   96,   0.5e6,  2.5e-4),
    "xl":      (1.3e9,   24,  2048,   16,  128,   1.0e6,  2.0e-4),
    "2.7b":    (2.7e9,   32,  2560,   32,   80,   1.0e6,  1.6e-4),
    "6.7b":    (6.7e9,   32,  4096,   32,  128,   2.0e6,  1.2e-4),
    "13b":     (13e9,    40,  5120,   40,  128,   2.0e6,  1.0e-4),
    "175b":    (175e9,   96, 12288,   96,  128,   3.2e6,  0.6e-4),
}
GPT3_ALIASES = {"125m": "small", "350m": "medium", "760m": "large", "1.3b": "xl"}
GPT3_CONTEXT = 2048
GPT2_VOCAB = 50257

# CPU sizes: `test` for unit tests, `tiny` for the embedded-default pipeline on 2 cores
# (the prototype's 0.4M-param model learned the task suite), `mini` for a quick single-GPU check.
#              L  d_model heads d_head context vocab batch  lr
CPU_SIZES = {
    "test": (2,   64,  4,  16,  64,   512,  8, 1e-3),
    "tiny": (2,  128,  4,  32, 128,  2048, 32, 3e-3),
    "mini": (6,  512,  8,  64, 512,  8192, 32, 6e-4),
}
SIZES = tuple(CPU_SIZES) + tuple(GPT3_SIZES) + tuple(GPT3_ALIASES)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses big_vision-style `key=value,key=value` config arguments over typed defaults."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} is not key=value (in {arg!r})")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
        out[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else value.lower() in ("1", "true", "yes")
    return out


def model_config(size: str) -> ml_collections.ConfigDict:
    """The `model` section for a named size."""
    from instructgpt_jax.models import attention

    size = GPT3_ALIASES.get(size, size)
    if size in CPU_SIZES:
        n_layers, d_model, n_heads, d_head, max_len, vocab, _, _ = CPU_SIZES[size]
        nominal = 0.0
    elif size in GPT3_SIZES:
        nominal, n_layers, d_model, n_heads, d_head, _, _ = GPT3_SIZES[size]
        max_len, vocab = GPT3_CONTEXT, GPT2_VOCAB
    else:
        raise ConfigError(f"unknown model size {size!r} (key: size); known: {', '.join(SIZES)}")
    attn = attention.default_config()
    if max_len < GPT3_CONTEXT:  # scale the sparse patterns' lengths with the short CPU contexts
        attn.update(block_size=max_len // 4, stride=max_len // 4, local_window=max_len // 2, fixed_c=max_len // 16)
    return ml_collections.ConfigDict(dict(
        size=size,
        nominal_params=nominal,
        vocab_size=vocab,
        max_len=max_len,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_ff=4 * d_model,
        embd_dropout=0.0,
        attn_dropout=0.0,
        resid_dropout=0.0,
        dtype="float32",  # compute dtype; "bfloat16" on accelerators. Parameters are always float32.
        remat="none",  # none | full | dots
        vocab_pad_multiple=128,
        # Losses run the tied LM head + cross-entropy this many tokens at a time, never holding the
        # [tokens, vocab] logits (losses.chunked_lm_head_losses); 0: the full logits. On the 2-core CPU
        # (bench train, 8L-512, vocab 8192, 4096 tokens, interleaved A/B) 512 took 0.84-0.99x (median 0.94)
        # the step time of full logits and 330 MiB less scratch; tiny 0.89x. Accelerators are unmeasured, so
        # the paper sizes keep 0.
        lm_head_chunk=512 if size in CPU_SIZES else 0,
        attention=attn,
    ))


def batch_and_lr(size: str) -> tuple[int, float]:
    """Global batch (sequences) and peak learning rate for a size (GPT-3 Table 2.1 for the paper's sizes)."""
    size = GPT3_ALIASES.get(size, size)
    if size in CPU_SIZES:
        return CPU_SIZES[size][6], CPU_SIZES[size][7]
    if size not in GPT3_SIZES:
        raise ConfigError(f"unknown model size {size!r} (key: size); known: {', '.join(SIZES)}")
    tokens, lr = GPT3_SIZES[size][5], GPT3_SIZES[size][6]
    return int(round(tokens / GPT3_CONTEXT / 256) * 256), lr  # 0.5M tokens -> 256 sequences, 3.2M -> 1536


def optim_config(lr: float, total_steps: int, warmup_steps: int) -> ml_collections.ConfigDict:
    """AdamW as GPT-3 (Brown et al. 2020, App. B): β=(0.9, 0.95), ε=1e-8, clip 1.0, wd 0.1, cosine to 10%."""
    return ml_collections.ConfigDict(dict(
        lr=lr,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # cosine decay ends here (then stays at final_lr_ratio·lr)
        final_lr_ratio=0.1,
        grad_accum_steps=1,
        nonfinite="skip",  # skip | stop: what a non-finite loss/gradient does
    ))


# Logical axis name -> mesh axes. Parameters: `embed` is sharded over fsdp (ZeRO-3 style), `heads`,
# `mlp` and `vocab` over tensor (Megatron). Activations use the `act_*` / `batch` names.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
)


def base_config(stage: str, size: str) -> ml_collections.ConfigDict:
    """Everything a stage needs; experiment files change what they study."""
    from instructgpt_jax.data import pipeline, tokenizer

    batch_size, lr = batch_and_lr(size)
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.dry_run = False
    c.model = model_config(size)
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=batch_size,  # global, in sequences
        seq_len=c.model.max_len,
        log_every=25,
        eval_every=250,
        eval_batches=8,
        checkpoint_every=250,
        keep_checkpoints=3,
        async_checkpoints=True,
        progress_bar=True,
    ))
    c.optim = optim_config(lr, total_steps=1000, warmup_steps=50)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.parallelism = "mesh"
    c.sharding_rules = DEFAULT_RULES
    c.init = ml_collections.ConfigDict(dict(params=""))  # earlier stage's workdir to start from
    c.data = pipeline.default_data_config()
    c.tokenizer = tokenizer.default_tokenizer_config()
    c.tokenizer.vocab_size = c.model.vocab_size
    c.model.vocab_size = c.tokenizer.get_ref("vocab_size")  # one number: override either key
    return c


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks impossible values once, at start, with a message naming the key."""
    from instructgpt_jax.models import attention

    check_types(c)
    m = c.model
    for key in ("n_layers", "d_model", "n_heads", "d_head", "d_ff", "vocab_size", "max_len"):
        if not isinstance(m[key], int) or m[key] <= 0:
            raise ConfigError(f"model.{key} must be a positive integer, got {m[key]!r}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    for key in ("embd_dropout", "attn_dropout", "resid_dropout"):
        if not 0.0 <= m[key] < 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1), got {m[key]}")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    if m.remat not in ("none", "full", "dots"):
        raise ConfigError(f"model.remat must be none, full or dots, got {m.remat!r}")
    if m.get("lm_head_chunk", 0) < 0:
        raise ConfigError(f"model.lm_head_chunk must be >= 0 (0: full logits), got {m.lm_head_chunk}")
    t = c.train
    if t.seq_len > m.max_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_len={m.max_len}")
    for key in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if t[key] <= 0:
            raise ConfigError(f"train.{key} must be positive, got {t[key]}")
    o = c.optim
    for key in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip"):
        if not math.isfinite(o[key]):
            raise ConfigError(f"optim.{key}={o[key]} must be finite")
    if o.lr <= 0 or not 0 <= o.final_lr_ratio <= 1 or o.warmup_steps < 0 or o.grad_accum_steps < 1:
        raise ConfigError(f"optim: need lr > 0, 0 <= final_lr_ratio <= 1, warmup_steps >= 0, grad_accum_steps >= 1; got {dict(o)}")
    if o.nonfinite not in ("skip", "stop"):
        raise ConfigError(f"optim.nonfinite must be skip or stop, got {o.nonfinite!r}")
    attention.validate(m.attention, t.seq_len, m.n_heads, dropout_rate=m.attn_dropout)
    if "data" in c:
        from instructgpt_jax.data import pipeline, tokenizer

        pipeline.validate_data_config(c.data)
        tokenizer.validate_tokenizer_config(c.tokenizer)
    if num_devices is not None:
        validate_mesh(c, num_devices)


# Keys whose type a config file could get wrong (command-line overrides are type-checked by ml_collections).
TYPED_KEYS = {
    "seed": int,
    **{f"model.{k}": int for k in ("n_layers", "d_model", "n_heads", "d_head", "d_ff", "vocab_size", "max_len",
                                   "lm_head_chunk")},
    **{f"model.{k}": float for k in ("embd_dropout", "attn_dropout", "resid_dropout")},
    **{f"train.{k}": int for k in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
                                   "checkpoint_every", "keep_checkpoints")},
    **{f"optim.{k}": float for k in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "final_lr_ratio")},
    **{f"optim.{k}": int for k in ("warmup_steps", "decay_steps", "grad_accum_steps")},
    **{f"mesh.{k}": int for k in ("data", "fsdp", "tensor")},
}


def check_types(c: ml_collections.ConfigDict) -> None:
    """A ConfigError naming the key for a value of the wrong type (an int is accepted for a float)."""
    for key, kind in TYPED_KEYS.items():
        node = c
        for part in key.split("."):
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            continue
        ok = isinstance(node, kind) or (kind is float and isinstance(node, int))
        if not ok or isinstance(node, bool):
            raise ConfigError(f"{key}={node!r}: expected {kind.__name__}, got {type(node).__name__}")


def validate_mesh(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 in mesh.{data,fsdp,tensor} and checks the product and the batch split."""
    if c.parallelism not in ("mesh", "pmap"):
        raise ConfigError(f"parallelism must be 'mesh' or 'pmap', got {c.parallelism!r}")
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    names = ["mesh.data", "mesh.fsdp", "mesh.tensor"]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"at most one of {names} may be -1 (fill), got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ConfigError(f"mesh {dict(zip(names, sizes))} does not fit {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {dict(zip(names, sizes))} uses {math.prod(sizes)} devices but {num_devices} are present")
    batch_shards = sizes[0] * sizes[1]
    if c.parallelism == "pmap":  # pure data parallelism: a whole state per device, the batch split over them
        if sizes[1] != 1 or sizes[2] != 1:
            raise ConfigError(f"parallelism='pmap' replicates the state on every device: it needs mesh.fsdp=1 and "
                              f"mesh.tensor=1, got {dict(zip(names, sizes))} (use parallelism='mesh' to shard)")
        if c.train.batch_size % batch_shards:
            raise ConfigError(f"parallelism='pmap' splits train.batch_size={c.train.batch_size} over the "
                              f"{batch_shards} devices; it is not divisible by {batch_shards}")
    if c.train.batch_size % batch_shards:
        raise ConfigError(f"train.batch_size={c.train.batch_size} is not divisible by mesh.data·mesh.fsdp={batch_shards}")
    if c.model.n_heads % sizes[2]:
        raise ConfigError(f"model.n_heads={c.model.n_heads} is not divisible by mesh.tensor={sizes[2]}")
    return tuple(sizes)


EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def load_config_module(path: str):
    """Executes an experiment/ablation config file (Python by design: the one file type this project
    executes) and returns it as a module."""
    if not os.path.isfile(path):
        raise ConfigError(f"no such config file {path!r}")
    name = "experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`experiments/<name>.py`'s get_config(arg), e.g. experiment_config("ppo", "size=tiny,variant=ppo")."""
    return load_config_module(os.path.join(EXPERIMENTS_DIR, f"{name}.py")).get_config(arg)
