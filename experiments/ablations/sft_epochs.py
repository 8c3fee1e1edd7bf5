"""Ablation: SFT epochs — validation loss vs RM score vs gold score, per epoch (InstructGPT App. C.1).

InstructGPT: the SFT models overfit on validation loss after 1 epoch, yet training longer keeps improving the
RM score and human preference ratings; hence 16 epochs, with the final epoch chosen by RM score.

Variants run in order. `pipeline_rm` runs (or finds) the ordinary pipeline's pretrain, SFT and RM in
WORKDIR/shared (no evaluation, no rows): its RM scores the epochs. `sft_8_epochs` and `sft_16_epochs`
(InstructGPT's count) fine-tune the shared pretrained model (ordinary tiny SFT otherwise: lr, 12.5% pretraining
mix, cosine decay over all epochs, so the two differ in schedule too) and record for every epoch's checkpoint the validation loss, the shared RM's mean score of greedy
responses to 256 validation prompts (`sft.select_reward`, which also selects the epoch, as InstructGPT) and
the gold labeler's mean score of greedy responses to 256 validation prompts (`sft.gold_eval_prompts`).
On 3000 demonstrations instead of the pipeline's 12000: the regime App. C.1 describes is a model that can
fit its demonstrations (175B parameters, ~13k demonstrations); the 0.7M-parameter tiny model underfits 12000
(validation loss still falling after 2 epochs), so a smaller set lets it reach that regime in 8 epochs.

  python -m instructgpt_jax.ablate experiments/ablations/sft_epochs.py --workdir=runs/ablations/sft_epochs
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_ablation as common  # noqa: E402

from instructgpt_jax import configs  # noqa: E402
from instructgpt_jax.stages import sft  # noqa: E402

TITLE = "SFT epochs: validation loss vs RM score vs gold score of greedy responses (tiny)"
VARIANTS = {"pipeline_rm": "part=rm", "sft_8_epochs": "epochs=8", "sft_16_epochs": "epochs=16"}
COLUMNS = ["variant", "epoch", "validation_loss", "rm_score", "gold", "selected"]
PARTS = ("rm", "epochs")


def get_config(arg=None):
    arg = configs.parse_arg(arg, size="tiny", part="epochs", epochs=8, demonstrations=3000, prompts=256)
    if arg.part not in PARTS:
        raise configs.ConfigError(f"part={arg.part!r}: expected one of {PARTS}")
    if arg.part == "rm":  # the ordinary pipeline's stages, shared: the RM that scores the epochs
        c = common.pipeline_config(arg.size, run=("pretrain", "sft", "rm"))
    else:
        c = common.pipeline_config(arg.size, share=("pretrain",), run=("pretrain", "sft"))
        s = c.stages.sft
        s.sft.epochs = arg.epochs
        s.labeler.num_demonstrations = arg.demonstrations
        # Resolved against WORKDIR/<variant>/sft: the shared RM of the `pipeline_rm` variant.
        s.sft.select_reward = common.SHARED.replace("{workdir}", "{workdir}/..") + "rm"
        s.sft.select_prompts = s.sft.gold_eval_prompts = arg.prompts
    common.skip_evaluation(c)
    return c


def summarize(name, config, workdir):
    if config.shared_stages.sft:
        return []  # the shared stages only
    selection = sft.read_selection(os.path.join(workdir, "sft"))
    return [{"epoch": e["epoch"], "validation_loss": e["validation_loss"], "rm_score": e["reward"], "gold": e["gold"],
             "selected": e["epoch"] == selection["selected_epoch"]} for e in selection["epochs"]]


def plot(rows, path):
    fig, axes = common.figure(3)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        for ax, key in zip(axes, ("validation_loss", "rm_score", "gold")):
            ax.plot([r["epoch"] for r in runs], [r[key] for r in runs], marker="o", label=variant)
            ax.set(xlabel="SFT epoch", ylabel=key)
    axes[0].legend(fontsize=7)
    common.save(fig, path, TITLE)
