"""What every stage does first: validate, write config.json, mesh, tokenizer, writer, checkpointer."""
from __future__ import annotations

import json
import math
import os

import jax

from instructgpt_jax import configs
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models import gpt
from instructgpt_jax.train import sharding
from instructgpt_jax.train.checkpoint import Checkpointer
from instructgpt_jax.train.metrics import MetricWriter


def enable_compilation_cache() -> None:
    """Each distinct jitted function costs seconds to compile on CPU: keep them across runs.
    A cache directory already configured (tests, an embedding program) is kept."""
    if jax.config.jax_compilation_cache_dir:
        return
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/instructgpt_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def prepare_workdir(config, workdir: str) -> str:
    """Creates the workdir (clear error if impossible) and writes config.json into it."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir}: exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror or e})") from e
    return workdir


def load_tokenizer(config):
    """The configured tokenizer (trained on the data mixture and cached when tokenizer.path is empty)."""
    from instructgpt_jax.data import pipeline

    tokenizer = pipeline.load_tokenizer(config.tokenizer, config.data)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ConfigError(f"the tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but "
                          f"model.vocab_size={config.model.vocab_size}; set tokenizer.vocab_size / model.vocab_size to agree")
    return tokenizer


def describe_model(config) -> str:
    cfg = gpt.GPTConfig.from_config(config.model)
    n = gpt.count_params(cfg)
    nominal = config.model.nominal_params
    vs = f" (nominal {nominal / 1e6:,.0f}M, {100 * (n / nominal - 1):+.2f}%)" if nominal else ""
    return (f"model {config.model.size}: {n:,} parameters{vs}; {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.n_heads} heads x {cfg.d_head}, context {cfg.max_len}, attention {cfg.attention.layers}")


def setup(config, workdir: str):
    """Validates the config against the devices and returns (workdir, mesh, writer, checkpointer)."""
    configs.validate(config, jax.device_count())
    workdir = prepare_workdir(config, workdir)
    mesh = sharding.make_mesh(config)
    log(describe_model(config))
    log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)")
    writer = MetricWriter(workdir, config.stage)
    checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints)
    return workdir, mesh, writer, checkpointer


def dry_run(config, init_boxed, make_step, abstract_batch) -> dict:
    """--config.dry_run=True: shapes, per-device memory and an AOT-lowered step; nothing allocated.

    make_step(mesh, state_shardings) -> the stage's jitted step. The mesh may exceed the devices here."""
    from instructgpt_jax.train import dry_run as planner

    configs.validate(config)
    log(describe_model(config))
    mesh_sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    fits = -1 in mesh_sizes or math.prod(mesh_sizes) <= jax.device_count()
    mesh = sharding.make_mesh(config, jax.devices()[:math.prod(mesh_sizes)] if -1 not in mesh_sizes else None) \
        if fits else sharding.abstract_mesh(config)
    rules = sharding.rules(config)
    abstract_state, shardings = sharding.abstract_init(init_boxed, mesh, rules, jax.random.PRNGKey(config.seed))
    batch_sharding = sharding.batch_sharding(mesh)
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding), abstract_batch)
    return planner.report(config, mesh, abstract_state, make_step(mesh, shardings), batch, log=log)


def save_json(path: str, obj) -> None:
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    """The JSON object a stage wrote with save_json, or None when it has not been written."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
