"""A PyTorch step of the same model, for `bench train --reference`: the peer figure the perf issue sets the
target by. Optional: needs torch (the `hf` extra installs it), imported only when asked for.

The reference is the nanoGPT-style way to write this model in PyTorch: pre-LayerNorm GPT-2 blocks, causal
`scaled_dot_product_attention`, tanh GELU, an LM head tied to the token embedding, cross-entropy on the
full logits, foreach AdamW (decay on matrices, as train/state.decay_mask) after global-norm clipping, the
same shapes and FLOPs as GPT(cfg) (checked: its matmul parameters equal gpt.matmul_params). "eager" runs it
as written; "compile" wraps the forward pass in torch.compile (Inductor; the backward is compiled with it).
"""
from __future__ import annotations

from instructgpt_jax.bench import common
from instructgpt_jax.errors import UserError
from instructgpt_jax.models import gpt

MODES = ("eager", "compile")


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise UserError("bench train --reference needs PyTorch: pip install -e '.[hf]' (or pip install torch)") from e
    return torch


def build_model(torch, cfg: gpt.GPTConfig, seq_len: int):
    nn, F = torch.nn, torch.nn.functional
    d_attn = cfg.n_heads * cfg.d_head

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(cfg.d_model, eps=1e-5), nn.LayerNorm(cfg.d_model, eps=1e-5)
            self.qkv, self.out = nn.Linear(cfg.d_model, 3 * d_attn), nn.Linear(d_attn, cfg.d_model)
            self.fc, self.proj = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, cfg.n_heads, cfg.d_head).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(attended.transpose(1, 2).reshape(b, t, d_attn))
            return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(cfg.padded_vocab, cfg.d_model), nn.Embedding(seq_len, cfg.d_model)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layers))
            self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5)

        def forward(self, inputs, targets):
            x = self.wte(inputs) + self.wpe.weight[None, : inputs.shape[1]]
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return GPT()


def matmul_params(model) -> int:
    """Weights that take part in matmuls: every matrix except the position table (gpt.matmul_params)."""
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and not name.startswith("wpe"))


def require_matching(cfg: gpt.GPTConfig) -> None:
    """UserError naming the settings of cfg the reference does not reproduce: it is dense, float32, without
    dropout or remat."""
    layers = cfg.attention.layers if cfg.attention is not None else "dense"
    unmatched = [] if layers == "dense" else [f"model.attention.layers={layers!r}"]
    unmatched += [f"model.{name}={getattr(cfg, name)}" for name in ("embd_dropout", "attn_dropout", "resid_dropout")
                  if getattr(cfg, name) > 0]
    unmatched += [] if cfg.remat == "none" else [f"model.remat={cfg.remat!r}"]
    unmatched += [] if cfg.dtype == "float32" else [f"model.dtype={cfg.dtype!r}"]
    if unmatched:
        raise UserError(f"--reference times the same model with dense float32 attention, no dropout and no remat; "
                        f"this run sets {', '.join(unmatched)}")


def make_step(cfg: gpt.GPTConfig, optim_cfg, tokens, mode: str):
    """A no-argument callable running one training step of the reference on tokens [B, T+1] (a numpy array)."""
    if mode not in MODES:
        raise UserError(f"--reference: unknown PyTorch mode {mode!r} (choose from {', '.join(MODES)})")
    require_matching(cfg)
    torch = import_torch()
    torch.manual_seed(0)
    model = build_model(torch, cfg, tokens.shape[1] - 1)
    if matmul_params(model) != gpt.matmul_params(cfg):
        raise AssertionError(f"the PyTorch reference has {matmul_params(model)} matmul parameters, "
                             f"GPT(cfg) {gpt.matmul_params(cfg)}: the FLOP counts would differ")
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": optim_cfg.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps, foreach=True)
    forward = torch.compile(model) if mode == "compile" else model
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def one_step():
        loss = forward(inputs, targets)
        loss.backward()
        if optim_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return one_step


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """Throughput of PyTorch's n x n x n float32 matmul (timed as common.matmul_flops_per_s times XLA's):
    PyTorch's own peak on this machine, for comparison."""
    a = import_torch().randn(n, n)
    return 2.0 * n ** 3 / common.time_call(lambda: a @ a, repeats=repeats, warmup=2)["median_s"]
