"""Ablation: dense vs Sparse Transformer attention (Child et al. 2019) vs GPT-3's alternating layers.

Same model, data, steps and seed; only `model.attention.layers` changes. Context 512 so that the
patterns are actually sparse (at T=128 every pattern is nearly dense).

  python -m instructgpt_jax.ablate experiments/ablations/sparse_vs_dense.py --workdir=runs/ablations/sparse
"""
from instructgpt_jax import configs

TITLE = "Sparse vs dense attention (tiny model, T=512, same data and steps)"
VARIANTS = {
    "dense": "attention=dense",
    "fixed": "attention=fixed",
    "strided": "attention=strided",
    "gpt3_alternating": "attention=gpt3_alternating",
}
COLUMNS = ["variant", "attention", "final_train_loss", "final_eval_loss", "tokens_per_s", "step_memory_gib", "wall_s"]


def get_config(arg=None):
    arg = configs.parse_arg(arg, attention="dense", steps=150, seq_len=512)
    c = configs.base_config("pretrain", "tiny")
    c.model.max_len = c.train.seq_len = arg.seq_len
    # Child et al. 2019 use l = 128 for text; scaled to this context: blocks of 64, band of 128.
    c.model.attention.update(layers=arg.attention, block_size=64, stride=64, local_window=128, fixed_c=8)
    c.train.batch_size = 8
    c.train.steps = arg.steps
    c.optim.decay_steps = arg.steps
    c.optim.warmup_steps = arg.steps // 20
    c.train.log_every = max(1, arg.steps // 15)
    c.train.eval_every = c.train.checkpoint_every = max(1, arg.steps // 5)
    c.train.progress_bar = False
    return c
