"""Ablation: the KL coefficient β (InstructGPT eq. 2; Ziegler et al. 2019), including β = 0.

Pretrain, SFT and RM run once (WORKDIR/shared); each β trains its own PPO from them. The table gives gold
score vs KL to SFT (the frontier) and RM score vs gold score: over-optimisation shows as the RM score
rising while the gold score falls (Gao et al. 2022; the prototype saw it at KL ≈ 2 nats).

  python -m instructgpt_jax.ablate experiments/ablations/kl_coef.py --workdir=runs/ablations/kl_coef
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_ablation as common  # noqa: E402

from instructgpt_jax import configs  # noqa: E402

TITLE = "KL coefficient β: gold score, RM score and KL to SFT after PPO (tiny)"
VARIANTS = {"beta_0": "kl_coef=0.0", "beta_0.005": "kl_coef=0.005", "beta_0.02": "kl_coef=0.02",
            "beta_0.1": "kl_coef=0.1"}
COLUMNS = ["variant", "kl_coef", "gold", "gold_ci95", "win_rate_vs_sft", "rm_score", "kl_to_sft"]


def get_config(arg=None):
    arg = configs.parse_arg(arg, size="tiny", kl_coef=0.02)
    c = common.pipeline_config(arg.size)
    c.stages.ppo.ppo.kl_coef = arg.kl_coef
    c.evaluation.few_shot_prompts = 0  # not what this ablation measures
    return c


def summarize(name, config, workdir):
    results = common.read_results(workdir)
    return {"kl_coef": config.stages.ppo.ppo.kl_coef, **common.policy_row(results, "ppo"),
            "sft_gold": results["sft"]["sampled"]["gold"]["mean"]}


def plot(rows, path):
    common.scatter(rows, "kl_to_sft", ["gold", "rm_score"], path, TITLE, label="kl_coef")
