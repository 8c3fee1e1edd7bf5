"""PNG plots of a run: `python -m instructgpt_jax.plot WORKDIR [--out=DIR] [--results=ABLATION/results.json]`.

WORKDIR is one stage's workdir or a pipeline's (stage workdirs below it). For every metrics.jsonl found
(train/metrics.py's records: {"stage", "split", "step", "time", **metrics}) it writes
`<name>_curves.png`, each scalar metric against the step, train and eval splits together; for a PPO
stage (train records with "kl" and "rm_score") also `<name>_reward_vs_kl.png`, the RM score and gold
score against KL(π‖π_SFT) as the run goes (InstructGPT's reward/KL trade-off). For every ablation
results.json (instructgpt_jax/ablate.py) found or given, `<name>_sparse_vs_dense.png`: held-out loss
curves of the variants and their training throughput. Plots go to WORKDIR/plots unless --out is given.
"""
from __future__ import annotations

import json
import math
import os
import sys

from instructgpt_jax.errors import DataError, UserError, report

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
PLOTS_DIR = "plots"
NOT_PLOTTED = ("step", "time")
SPLIT_STYLES = {"train": dict(lw=1.0), "eval": dict(lw=1.5, marker="o", ms=3)}


def read_metrics(path: str) -> list[dict]:
    """The records of one metrics.jsonl; DataError naming the file and line of a malformed one."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not JSON ({e.msg})") from e
            if not isinstance(record, dict) or "step" not in record:
                raise DataError(f"{path}:{number}: a metrics record needs a 'step'")
            records.append(record)
    return records


def find_files(workdir: str, name: str) -> dict[str, str]:
    """{label: path} of every file called `name` under workdir, labelled by its directory relative to workdir
    ("a/b" -> "a_b"; the workdir itself by its own name). Checkpoint and plot directories are skipped."""
    found = {}
    for root, dirs, files in os.walk(workdir):
        dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard", PLOTS_DIR))
        if name in files:
            rel = os.path.relpath(root, workdir)
            label = os.path.basename(os.path.abspath(workdir)) if rel == "." else rel.replace(os.sep, "_")
            found[label] = os.path.join(root, name)
    return found


def scalar_series(records: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{metric: {split: (steps, values)}} of the finite scalar metrics, in file order."""
    series: dict = {}
    for r in records:
        for key, value in r.items():
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, {}).setdefault(r.get("split", "train"), ([], []))
            steps.append(int(r["step"]))
            values.append(float(value))
    return series


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_curves(records: list[dict], title: str, path: str) -> str | None:
    """One panel per scalar metric against the step (train and eval splits overlaid); None if there are none."""
    series = scalar_series(records)
    if not series:
        return None
    plt = _pyplot()
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, splits) in zip(axes.flat, sorted(series.items())):
        for split, (steps, values) in splits.items():
            ax.plot(steps, values, label=split, **SPLIT_STYLES.get(split, {}))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(splits) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_reward_vs_kl(records: list[dict], title: str, path: str) -> str | None:
    """RM score (and gold score when logged) against KL to the SFT policy over PPO iterations, coloured by
    step; None unless the train records carry both "kl" and "rm_score"."""
    rows = [r for r in records if r.get("split", "train") == "train" and "kl" in r and "rm_score" in r]
    if not rows:
        return None
    plt = _pyplot()
    panels = [k for k in ("rm_score", "gold_score") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        points = [(r["kl"], r[key], r["step"]) for r in rows if key in r]
        kl, value, step = zip(*points)
        ax.plot(kl, value, color="0.8", lw=0.8, zorder=1)
        dots = ax.scatter(kl, value, c=step, cmap="viridis", s=14, zorder=2)
        ax.set(xlabel="KL(π ‖ π_SFT) per episode", ylabel=key)
        fig.colorbar(dots, ax=ax, label="step")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_sparse_vs_dense(results: list[dict], title: str, path: str) -> str:
    """Held-out loss curves of an ablation's variants (training loss dashed) and their tokens/s."""
    plt = _pyplot()
    fig, (curves, speed) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw=dict(width_ratios=[3, 2]))
    for row in results:
        label = f"{row['variant']} ({row.get('attention', '?')})"
        line = None
        if row.get("eval_curve"):
            steps, losses = zip(*row["eval_curve"])
            (line,) = curves.plot(steps, losses, marker="o", ms=3, label=label)
        if row.get("curve"):
            steps, losses = zip(*row["curve"])
            curves.plot(steps, losses, ls="--", lw=0.8, alpha=0.7, color=line.get_color() if line else None,
                        label=None if line else label)
    curves.set(xlabel="step", ylabel="loss (held-out solid, train dashed)")
    curves.legend(fontsize=7)
    names = [row["variant"] for row in results]
    throughput = [row.get("tokens_per_s", float("nan")) for row in results]
    speed.bar(names, [0.0 if t is None or not math.isfinite(t) else t for t in throughput], color="C2")
    speed.set(ylabel="training tokens/s")
    speed.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def read_results(path: str) -> list[dict]:
    """An ablation's results.json (a list of variant rows); DataError naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e})") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "variant" in r for r in rows):
        raise DataError(f"{path}: not an ablation results.json (a list of rows with 'variant')")
    return rows


def plot_workdir(workdir: str, out_dir: str | None = None, results: str | None = None) -> list[str]:
    """Writes every plot for a stage or pipeline workdir (see the module docstring); returns their paths."""
    if not os.path.isdir(workdir):
        raise DataError(f"{workdir}: no such directory")
    out_dir = out_dir or os.path.join(workdir, PLOTS_DIR)
    metrics = find_files(workdir, METRICS_FILE)
    ablations = {label: path for label, path in find_files(workdir, RESULTS_FILE).items()
                 if _is_results(path)}
    if results:
        ablations[os.path.basename(os.path.dirname(os.path.abspath(results)))] = read_results(results) and results
    if not metrics and not ablations:
        raise DataError(f"{workdir}: no {METRICS_FILE} (nor ablation {RESULTS_FILE}) below it")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for label, path in sorted(metrics.items()):
        records = read_metrics(path)
        stage = next((r["stage"] for r in records if "stage" in r), label)
        title = f"{label} ({stage})" if stage != label else label
        written.append(plot_curves(records, title, os.path.join(out_dir, f"{label}_curves.png")))
        written.append(plot_reward_vs_kl(records, f"{title}: reward vs KL", os.path.join(out_dir, f"{label}_reward_vs_kl.png")))
    for label, path in sorted(ablations.items()):
        written.append(plot_sparse_vs_dense(read_results(path), f"{label}: sparse vs dense attention",
                                            os.path.join(out_dir, f"{label}_sparse_vs_dense.png")))
    return [p for p in written if p]


def _is_results(path: str) -> bool:
    try:
        read_results(path)
        return True
    except DataError:
        return False


def main(argv: list[str]) -> int:
    usage = "usage: python -m instructgpt_jax.plot WORKDIR [--out=DIR] [--results=ABLATION/results.json]"
    positional = [a for a in argv if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if len(positional) != 1 or set(options) - {"out", "results"} or len(options) != len(argv) - 1:
        print(usage, file=sys.stderr)
        return 2
    try:
        for path in plot_workdir(positional[0], options.get("out"), options.get("results")):
            print(path)
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
