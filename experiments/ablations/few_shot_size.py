"""Ablation: zero-, one- and few-shot accuracy vs model size (GPT-3, Brown et al. 2020, Fig. 1.2 / §3).

GPT-3: in-context learning improves with scale: from 125M to 175B parameters zero-shot accuracy rises slowly,
while one- and few-shot accuracy rise faster, so the gap between them widens with size (on the smallest
models extra examples barely help or hurt).

Three pretrained trunks from the pipeline's pretrain stage, the same data, steps (300), batch and learning
rate (only the trunk changes; experiments/ablations/pipeline_ablation.py MODELS): `narrow` (1 layer, d_model
64: 0.19M parameters), `base` (tiny: 2 layers, d_model 128, 0.68M; WORKDIR/shared) and `deep` (4 layers,
d_model 128, 1.07M). Each runs the pipeline with `run=("pretrain",)`: no SFT, RM or PPO, then only the k-shot
evaluation (greedy, gold-scored, k = 0, 1, 3 solved examples of the same task family in context) on 512
held-out test prompts. The held-out LM loss is the pretrain stage's last evaluation.

  python -m instructgpt_jax.ablate experiments/ablations/few_shot_size.py --workdir=runs/ablations/few_shot_size
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_ablation as common  # noqa: E402

from instructgpt_jax import configs  # noqa: E402

TITLE = "Zero/one/few-shot gold accuracy of pretrained models vs size (tiny family, same data and steps)"
VARIANTS = {"narrow": "model=narrow", "base": "model=base", "deep": "model=deep"}
KS = (0, 1, 3)
COLUMNS = ["variant", "params", "lm_loss", *(f"{k}_shot" for k in KS), "ci95", f"{KS[-1]}_shot_mean_k"]


def get_config(arg=None):
    arg = configs.parse_arg(arg, size="tiny", model="base", prompts=512)
    if arg.prompts < 1:
        raise configs.ConfigError(f"prompts={arg.prompts}: the k-shot evaluation needs >= 1 prompt "
                                  "(evaluation.few_shot_prompts)")
    c = common.pipeline_config(arg.size, share=("pretrain",), run=("pretrain",), model=arg.model)
    common.skip_evaluation(c)
    c.evaluation.update(few_shot_prompts=arg.prompts, few_shot_ks=KS)
    return c


def summarize(name, config, workdir):
    from instructgpt_jax import plot as plots

    few_shot = common.read_results(workdir)["pretrained"]["few_shot"]
    evals = [r for r in plots.read_metrics(os.path.join(workdir, "pretrain", "metrics.jsonl")) if r["split"] == "eval"]
    row = {"params": common.parameters(config), "lm_loss": evals[-1]["loss"]}
    for k in config.evaluation.few_shot_ks:
        row[f"{k}_shot"] = few_shot[f"{k}_shot"]["mean"]
        row[f"{k}_shot_ci95"] = few_shot[f"{k}_shot"]["ci95"]
        row[f"{k}_shot_mean_k"] = few_shot[f"{k}_shot"]["mean_k"]  # examples that fit the context, on average
    row["ci95"] = max(row[f"{k}_shot_ci95"] for k in config.evaluation.few_shot_ks)  # the widest of the k
    return row


def plot(rows, path):
    fig, (shots, loss) = common.figure(2)
    rows = sorted(rows, key=lambda r: r["params"])
    params = [r["params"] for r in rows]
    for k in KS:
        shots.errorbar(params, [r[f"{k}_shot"] for r in rows], yerr=[r[f"{k}_shot_ci95"] for r in rows], marker="o",
                       capsize=3, label=f"{k}-shot")
    shots.set(ylabel="gold accuracy (greedy, ± 95% CI)")
    shots.legend(fontsize=8)
    loss.plot(params, [r["lm_loss"] for r in rows], "ko-")
    loss.set(ylabel="held-out LM loss")
    for ax in (shots, loss):
        common.params_axis(ax, params)
    common.save(fig, path, TITLE)
