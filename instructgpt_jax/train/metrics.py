"""Metrics to the console, WORKDIR/metrics.jsonl and TensorBoard event files (no TensorFlow needed).

Only process 0 writes. Weights & Biases is used too when installed and `WANDB_PROJECT` is set.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def to_python(metrics: dict) -> dict:
    return {k: (float(np.asarray(v)) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}


class MetricWriter:
    """Opens its files on the first write, so a run that fails during setup leaves the workdir as it was."""

    def __init__(self, workdir: str, stage: str, console=print):
        self.enabled = jax.process_index() == 0
        self.workdir, self.stage, self.console = workdir, stage, console
        self.tb = self.wandb = self.jsonl = None

    def _open(self) -> None:
        workdir = self.workdir
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if os.environ.get("WANDB_PROJECT"):
            try:
                import wandb

                self.wandb = wandb.init(project=os.environ["WANDB_PROJECT"], name=f"{self.stage}:{workdir}", reinit=True)
            except ImportError:
                self.wandb = None

    def write(self, step: int, metrics: dict, prefix: str = "train", echo: bool = True) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open()
        values = to_python(metrics)
        record = {"stage": self.stage, "split": prefix, "step": int(step), "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if isinstance(v, float):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)
        if echo and self.console is not None:
            shown = " ".join(f"{k}={format_value(v)}" for k, v in values.items() if isinstance(v, float))
            self.console(f"[{self.stage}] {prefix} step {step}: {shown}")

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def format_value(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
