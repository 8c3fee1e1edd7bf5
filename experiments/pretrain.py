"""Stage 1 — pretraining a GPT-2/3 style decoder (Brown et al. 2020 §2) on a weighted mixture.

  python -m instructgpt_jax.main --config=experiments/pretrain.py:size=tiny --workdir=runs/tiny
  python -m instructgpt_jax.main --config=experiments/pretrain.py:size=small,attention=gpt3_alternating ...
  ... --config.optim.lr=3e-4 --config.train.steps=2000

Sizes: test, tiny, mini (CPU / single GPU) and the GPT-3 table: small medium large xl 2.7b 6.7b 13b 175b.
"""
from instructgpt_jax import configs


def get_config(arg=None):
    arg = configs.parse_arg(arg, size="tiny", attention="dense", steps=0)
    c = configs.base_config("pretrain", arg.size)
    c.model.attention.layers = arg.attention
    if arg.size in configs.CPU_SIZES:
        # The embedded default: stdlib source (real code + docstrings) and the task suite, mixed by weight.
        c.train.steps = arg.steps or {"test": 20, "tiny": 300, "mini": 2000}[arg.size]
        c.optim.warmup_steps = max(1, c.train.steps // 20)
        c.train.log_every = max(1, c.train.steps // 20)
        c.train.eval_every = c.train.checkpoint_every = max(1, c.train.steps // 4)
    else:
        # GPT-3 App. B: warmup over the first 375M tokens, cosine decay over 260B tokens; 300B tokens in all.
        c.model.dtype = "bfloat16"
        tokens_per_step = c.train.batch_size * c.train.seq_len
        c.train.steps = arg.steps or int(300e9 // tokens_per_step)
        c.optim.warmup_steps = int(375e6 // tokens_per_step)
        c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 100, 2000, 2000
    if arg.size in configs.CPU_SIZES:
        c.optim.decay_steps = c.train.get_ref("steps")  # --config.train.steps=N stretches the schedule too
    else:
        c.optim.decay_steps = int(260e9 // (c.train.batch_size * c.train.seq_len))
    return c
