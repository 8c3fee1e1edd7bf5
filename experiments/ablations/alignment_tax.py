"""Ablation: the alignment tax and PPO-ptx's γ (InstructGPT §3.5 eq. 2, Table 14's pattern).

Pretrain, SFT and RM run once (WORKDIR/shared); each γ trains its own PPO-ptx from them (γ = 0 is plain
PPO). Columns: held-out pretraining loss and zero/one/few-shot gold accuracy (what the tax costs) next to
the gold score on instructions (what alignment buys). InstructGPT: PPO regresses on public NLP tasks,
PPO-ptx (γ = 27.8) recovers most of it.

  python -m instructgpt_jax.ablate experiments/ablations/alignment_tax.py --workdir=runs/ablations/tax
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_ablation as common  # noqa: E402

from instructgpt_jax import configs  # noqa: E402

TITLE = "Alignment tax: PPO-ptx γ vs held-out LM loss, few-shot accuracy and gold score (tiny)"
# 0 is plain PPO, 27.8 InstructGPT's γ, 0.01 the tiny default. The tiny SFT model sits 0.57 nats above its
# pretraining optimum, so there γ = 0.01 already holds the LM loss at SFT's, 1 overshoots, 27.8 swamps PPO.
VARIANTS = {"gamma_0": "ptx_coef=0.0", "gamma_0.01": "ptx_coef=0.01", "gamma_1": "ptx_coef=1.0",
            "gamma_27.8": "ptx_coef=27.8"}
COLUMNS = ["variant", "ptx_coef", "lm_loss", "sft_lm_loss", "pretrained_lm_loss", "0_shot", "3_shot", "gold",
           "gold_ci95", "kl_to_sft"]


def get_config(arg=None):
    arg = configs.parse_arg(arg, size="tiny", ptx_coef=27.8)
    c = common.pipeline_config(arg.size, run=("pretrain", "sft", "rm", "ppo_ptx"))
    c.stages.ppo_ptx.ppo.ptx_coef = arg.ptx_coef
    c.evaluation.few_shot_ks = (0, 3)
    return c


def summarize(name, config, workdir):
    results = common.read_results(workdir)
    return {"ptx_coef": config.stages.ppo_ptx.ppo.ptx_coef, **common.policy_row(results, "ppo_ptx"),
            "sft_lm_loss": results["sft"]["pretrain_loss"], "pretrained_lm_loss": results["pretrained"]["pretrain_loss"]}


def plot(rows, path):
    common.scatter(rows, "ptx_coef", ["lm_loss", "gold"], path, TITLE, label="ptx_coef")
