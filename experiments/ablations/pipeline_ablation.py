"""Shared by the pipeline ablations: a pipeline config whose early stages are run once (WORKDIR/shared) and
shared by every variant, models of other sizes for the size ablations, and rows / plots read from a
variant's results.json."""
import os

from instructgpt_jax import configs

SHARED = "{workdir}/../shared/"
# Trunks for the size ablations, relative to the size's own model (`tiny`: 0.19M, 0.68M, 1.07M parameters).
# Same vocabulary (one tokenizer), context, data, steps and learning rate: only the trunk changes.
MODELS = ("narrow", "base", "deep")


def model_overrides(model: dict, name: str) -> dict:
    """`narrow`: half the layers and width (heads of the same size); `base`: the size's model; `deep`: twice
    the layers."""
    if name == "narrow":
        d_model = model["d_model"] // 2
        return dict(n_layers=max(1, model["n_layers"] // 2), d_model=d_model, n_heads=max(1, model["n_heads"] // 2),
                    d_ff=4 * d_model)
    if name == "deep":
        return dict(n_layers=2 * model["n_layers"])
    if name == "base":
        return {}
    raise configs.ConfigError(f"model={name!r}: expected one of {MODELS}")


def shared_dir(model: str) -> str:
    """WORKDIR/shared for the size's own model, WORKDIR/shared_<model> for another trunk."""
    return SHARED if model == "base" else f"{{workdir}}/../shared_{model}/"


def pipeline_config(size: str, share=("pretrain", "sft", "rm"), run=("pretrain", "sft", "rm", "ppo"), model="base"):
    c = configs.experiment_config("pipeline", f"size={size}")
    c.run = tuple(run)
    overrides = model_overrides(c.stages.pretrain.model, model)
    for stage in c.stages.values():  # every stage, and the PPO stages' RM: one trunk size throughout
        for section in ("model", "reward_model"):
            if section in stage:
                stage[section].update(overrides)
                if overrides:
                    stage[section].size = f"{size}/{model}"  # in the stages' logs
    for stage in share:
        c.shared_stages[stage] = shared_dir(model) + stage
    return c


def model_name(c) -> str:
    """The trunk a pipeline_config was made with (MODELS)."""
    size = c.stages.pretrain.model.size
    return size.split("/")[1] if "/" in size else "base"


def skip_evaluation(c) -> None:
    """Neither the policy comparison nor the k-shot evaluation: the ablation reads the stages' own files."""
    c.evaluation.prompts = c.evaluation.few_shot_prompts = 0


def parameters(c) -> int:
    from instructgpt_jax.models import gpt

    return gpt.count_params(gpt.GPTConfig.from_config(c.stages.pretrain.model))


def read_json(path: str) -> dict:
    """A file a finished variant's stages wrote (stages.common.read_json), which must exist."""
    from instructgpt_jax.errors import DataError
    from instructgpt_jax.stages import common

    record = common.read_json(path)
    if record is None:
        raise DataError(f"{path}: missing; did the variant's stages finish?")
    return record


def read_results(workdir: str) -> dict:
    return read_json(os.path.join(workdir, "results.json"))["policies"]


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


def figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.5))
    return fig, list(axes) if panels > 1 else [axes]


def save(fig, path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def params_axis(ax, params) -> None:
    """A log x axis labelled at the models' parameter counts."""
    ax.set(xscale="log", xlabel="parameters")
    ax.set_xticks(params, [f"{p / 1e6:.2f}M" for p in params], minor=False)
    ax.set_xticks([], minor=True)


def scatter(rows, x: str, ys, path: str, title: str, label: str = "variant") -> None:
    fig, axes = figure(len(ys))
    for ax, y in zip(axes, ys):
        for r in rows:
            ax.scatter(r[x], r[y])
            ax.annotate(str(r[label]), (r[x], r[y]), fontsize=8)
        ax.set(xlabel=x, ylabel=y)
    save(fig, path, title)
