"""Sweeps an ablation config and tabulates it: `python -m instructgpt_jax.ablate ABLATION.py --workdir=DIR`.

An ablation file is an experiment config (`get_config(arg)`) plus `VARIANTS`, a dict from variant
name to the config argument string that selects it. Each variant trains in WORKDIR/<name> (a
finished variant is skipped on rerun; an interrupted one resumes), and the runner writes
WORKDIR/results.json, WORKDIR/results.md (a table) and a plot: WORKDIR/loss.png (pretraining loss
curves), or WORKDIR/results.png from the file's `plot(rows, path)` when it defines `summarize(name,
config, variant_workdir) -> row` (pipeline ablations: a row from the variant's results.json). `summarize`
may return a list of rows instead (one per SFT epoch, say; none for a variant that only runs shared stages).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS  # defined when run as a program: importing this module (tests) defines no flags


def load_ablation(path: str):
    from instructgpt_jax import configs

    module = configs.load_config_module(path)
    if not hasattr(module, "VARIANTS"):
        from instructgpt_jax.errors import ConfigError

        raise ConfigError(f"{path} defines no VARIANTS (name -> config argument)")
    return module


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(name: str, config, records: list[dict], plan: dict, seconds: float) -> dict:
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    steady = [r["tokens_per_s"] for r in train[1:] if "tokens_per_s" in r] or [np.nan]
    return {
        "variant": name,
        "attention": config.model.attention.layers,
        "final_train_loss": train[-1]["loss"] if train else np.nan,
        "final_eval_loss": evals[-1]["loss"] if evals else np.nan,
        "tokens_per_s": float(np.median(steady)),
        "step_memory_gib": plan.get("xla_temp_gib", np.nan),
        "wall_s": seconds,
        "curve": [(r["step"], r["loss"]) for r in train],
        "eval_curve": [(r["step"], r["loss"]) for r in evals],
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["eval_curve"]:
            steps, losses = zip(*r["eval_curve"])
            ax.plot(steps, losses, marker="o", label=r["variant"])
    ax.set(xlabel="step", ylabel="held-out loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_variant(module, name: str, arg: str, workdir: str) -> list[dict]:
    """Trains (or finds finished) one variant and returns its rows: module.summarize(name, config, vdir)
    when the ablation defines it (pipeline ablations read the variant's results.json; a dict is one row),
    else the pretraining summary with the compiled step's memory."""
    import copy

    from instructgpt_jax import stages

    config = module.get_config(arg)
    vdir = os.path.join(workdir, name)
    start = time.perf_counter()
    if hasattr(module, "summarize"):
        if not os.path.isfile(os.path.join(vdir, "results.json")):
            stages.run(config, vdir)
        summary = module.summarize(name, config, vdir)
        seconds = time.perf_counter() - start
        return [{"variant": name, **row, "wall_s": seconds} for row in ([summary] if isinstance(summary, dict) else summary)]
    plan_config = copy.deepcopy(config)
    plan_config.dry_run = True
    plan = stages.run(plan_config, vdir)  # compiled step memory, no allocation
    records = read_metrics(vdir)
    if not any(r["split"] == "train" and r["step"] == config.train.steps for r in records):
        stages.run(config, vdir)
        records = read_metrics(vdir)
    return [summarize(name, config, records, plan, time.perf_counter() - start)]


def run_ablation(module, workdir: str, only=()) -> str:
    """Runs the variants (all, or those named in `only`) and writes results.md, results.json and the plot into
    workdir; returns the markdown table."""
    variants = {k: v for k, v in module.VARIANTS.items() if not only or k in only}
    rows = [row for name, arg in variants.items() for row in run_variant(module, name, arg, workdir)]
    columns = getattr(module, "COLUMNS", ["variant", "attention", "final_eval_loss", "tokens_per_s", "step_memory_gib"])
    table = markdown_table(rows, columns)
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# {getattr(module, 'TITLE', module.__name__)}\n\n{table}")
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1, default=float)
    if hasattr(module, "plot"):
        module.plot(rows, os.path.join(workdir, "results.png"))
    else:
        plot_curves(rows, os.path.join(workdir, "loss.png"), getattr(module, "TITLE", ""))
    return table


def main(argv):
    if len(argv) != 2 or FLAGS.workdir is None:
        raise app.UsageError("usage: python -m instructgpt_jax.ablate ABLATION.py --workdir=DIR")
    from instructgpt_jax.errors import UserError, report
    from instructgpt_jax.stages.common import enable_compilation_cache

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    try:
        table = run_ablation(load_ablation(argv[1]), FLAGS.workdir, FLAGS.only)
    except UserError as e:
        sys.exit(report(e))
    print(table)


if __name__ == "__main__":
    from instructgpt_jax import host_memory

    host_memory.keep_scratch_memory_mapped()
    flags.DEFINE_string("workdir", None, "Where the variants' workdirs and the tables go.")
    flags.DEFINE_list("only", [], "Run only these variants.")
    app.run(main)
