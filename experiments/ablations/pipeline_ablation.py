"""Shared by the pipeline ablations: a pipeline config whose early stages are run once (WORKDIR/shared) and
shared by every variant, and rows / plots read from a variant's results.json."""
import json
import os

from instructgpt_jax import configs

SHARED = "{workdir}/../shared/"


def pipeline_config(size: str, share=("pretrain", "sft", "rm"), run=("pretrain", "sft", "rm", "ppo")):
    c = configs.experiment_config("pipeline", f"size={size}")
    c.run = tuple(run)
    for stage in share:
        c.shared_stages[stage] = SHARED + stage
    return c


def read_results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        return json.load(f)["policies"]


def policy_row(results: dict, name: str) -> dict:
    """The ablations' columns for one policy of a pipeline's results (sampled at the PPO temperature)."""
    row = results[name]
    s = row["sampled"]
    out = {"gold": s["gold"]["mean"], "gold_ci95": s["gold"]["ci95"], "rm_score": s["rm_score"]["mean"],
           "kl_to_sft": s["kl_to_reference"]["mean"], "lm_loss": row["pretrain_loss"]}
    if "vs_sft" in s:
        out["win_rate_vs_sft"] = s["vs_sft"]["gold"]["win_rate"]
    for key, value in row.get("few_shot", {}).items():
        if isinstance(value, dict):
            out[key] = value["mean"]
    return out


def scatter(rows, x: str, ys, path: str, title: str, label: str = "variant") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(4 * len(ys), 3.5))
    for ax, y in zip(axes if len(ys) > 1 else [axes], ys):
        for r in rows:
            ax.scatter(r[x], r[y])
            ax.annotate(str(r[label]), (r[x], r[y]), fontsize=8)
        ax.set(xlabel=x, ylabel=y)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
