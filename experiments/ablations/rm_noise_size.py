"""Ablation: the reward model's held-out accuracy vs label noise and vs trunk size (InstructGPT §3.5, §4.1).

InstructGPT: labelers agree with each other on 72.6 ± 1.5% of comparisons (§3.4), and the 6B RMs reach
69.6 ± 0.9% accuracy on held-out comparisons (72.4% on the training labelers' data), i.e. near that ceiling;
RM accuracy grows with size (a 175B RM was slightly better but unstable, so 6B was used). Noisier labels lower
both the ceiling and what an RM can learn.

Label noise: `labeler.noise` ∈ {0, 0.32 (the calibrated default: two labelers agree on ~73%), 0.6} for the RM
of the tiny pipeline; pretrain and SFT shared (WORKDIR/shared), each variant trains only its RM.
Size: the `narrow` (1 layer, d_model 64: 0.19M parameters) and `deep` (4 layers, d_model 128: 1.07M) trunks
beside tiny's (0.68M), at noise 0.32; each needs its own pretraining and SFT (WORKDIR/shared_<trunk>) with the
same data, steps and learning rates (the trunks of few_shot_size.py: link its shared_<trunk>/pretrain here to
reuse them). At 300 pretraining steps `deep` is not a better language model than tiny (few_shot_size.py).
Every RM is trained on rankings of the same simulated responses (`rm.samples="simulated"`: the same prompts
and responses for every variant, so neither sweep changes what is being ranked; only the labels' noise
differs, and the pairs a labeler sees as tied are dropped: at noise 0 every gold tie, hence fewer pairs); the
labeler ceiling (two independent labelers at that noise) is measured on the same kind of samples.
Columns: accuracy vs the (noisy) labels, agreement with the gold scorer, how often the labels themselves agree
with gold, and the ceiling. An RM that learns the labelers' shared preference and not their noise can beat the
two-labeler ceiling on accuracy (it is one noisy labeler away from the truth, not two); its bound is
labels_gold_agreement, what a gold-perfect RM would score against the labels.

  python -m instructgpt_jax.ablate experiments/ablations/rm_noise_size.py --workdir=runs/ablations/rm_noise_size
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_ablation as common  # noqa: E402

from instructgpt_jax import configs  # noqa: E402
from instructgpt_jax.data import tasks  # noqa: E402
from instructgpt_jax.stages import rm  # noqa: E402

TITLE = "Reward model: held-out accuracy vs label noise and vs trunk size (tiny, simulated comparisons)"
VARIANTS = {"noise_0": "noise=0.0", "noise_0.32": "noise=0.32", "noise_0.6": "noise=0.6",
            "narrow_noise_0.32": "model=narrow,noise=0.32", "deep_noise_0.32": "model=deep,noise=0.32"}
COLUMNS = ["variant", "model", "params", "noise", "accuracy", "gold_agreement", "labels_gold_agreement", "ceiling",
           "pairs"]


def get_config(arg=None):
    arg = configs.parse_arg(arg, size="tiny", model="base", noise=tasks.LABELER_NOISE)
    if not arg.noise >= 0:
        raise configs.ConfigError(f"noise={arg.noise}: the labeler's noise std (labeler.noise) must be >= 0")
    c = common.pipeline_config(arg.size, share=("pretrain", "sft"), run=("pretrain", "sft", "rm"), model=arg.model)
    c.stages.rm.labeler.noise = arg.noise
    c.stages.rm.rm.samples = "simulated"
    common.skip_evaluation(c)
    return c


def summarize(name, config, workdir):
    r = config.stages.rm
    metrics = common.read_json(os.path.join(workdir, "rm", rm.EVAL_FILE))
    # rm_eval.json's ceiling is measured at the default noise; the ceiling at this variant's noise:
    ceiling = tasks.labeler_agreement(n_prompts=r.rm.ceiling_prompts, k=r.rm.responses_per_prompt, noise=r.labeler.noise)
    return {"model": common.model_name(config), "params": common.parameters(config), "noise": r.labeler.noise, "ceiling": ceiling,
            **{k: metrics[k] for k in ("accuracy", "gold_agreement", "labels_gold_agreement", "pairs")}}


def panel(ax, rows, x: str, **labels) -> None:
    for key, style in (("accuracy", "o-"), ("gold_agreement", "s-"), ("labels_gold_agreement", "g:"),
                       ("ceiling", "k--")):
        ax.plot([r[x] for r in rows], [r[key] for r in rows], style, label=key)
    ax.set(ylabel="held-out pairwise agreement", **labels)
    ax.legend(fontsize=7)


def plot(rows, path):
    fig, (by_noise, by_size) = common.figure(2)
    panel(by_noise, sorted((r for r in rows if r["model"] == "base"), key=lambda r: r["noise"]), "noise",
          xlabel="labeler noise std", title="base trunk")
    by_size_rows = sorted((r for r in rows if r["noise"] == tasks.LABELER_NOISE), key=lambda r: r["params"])
    panel(by_size, by_size_rows, "params", title=f"noise {tasks.LABELER_NOISE}")
    common.params_axis(by_size, [r["params"] for r in by_size_rows])
    common.save(fig, path, TITLE)
