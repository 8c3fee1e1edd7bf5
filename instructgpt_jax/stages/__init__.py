"""One runner per pipeline stage: `run(config, workdir)`; `main.py` dispatches on `config.stage`."""
from __future__ import annotations

import importlib

STAGES = ("pretrain", "sft", "rm", "ppo", "pipeline")


def run(config, workdir: str):
    from instructgpt_jax.errors import ConfigError

    if config.stage not in STAGES:
        raise ConfigError(f"stage={config.stage!r} is not one of {STAGES}")
    return importlib.import_module(f"instructgpt_jax.stages.{config.stage}").run(config, workdir)
