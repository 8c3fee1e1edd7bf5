"""What every stage does first: validate, write config.json, mesh, tokenizer, writer, checkpointer."""
from __future__ import annotations

import functools
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


CONFIG_FILE = "config.json"
PREVIOUS_CONFIG_FILE = "config.previous.json"  # the config of the run before, when this one's differs
_CHANGED_CONFIG: dict[str, bool] = {}  # workdir -> whether this run moved a different config.json aside


def prepare_workdir(config, workdir: str, *, update: bool = False) -> str:
    """Creates the workdir (clear error if impossible) and writes config.json into it. A different
    config.json already there (the run that wrote the workdir's checkpoints) is kept as
    config.previous.json, so that a resume that fails can name the changed keys and put it back.
    update=True rewrites the config.json this run already wrote (keys resolved since)."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir}: exists and is not a directory")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
            if not update:
                _CHANGED_CONFIG[workdir] = os.path.exists(path) and _read(path) != text
                if _CHANGED_CONFIG[workdir]:
                    os.replace(path, os.path.join(workdir, PREVIOUS_CONFIG_FILE))
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror or e})") from e
    return workdir


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _flat(tree, path: tuple = ()) -> dict:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, (*path, key)).items()}
    return {".".join(path): tree}


def config_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every leaf that differs (keys only in one side included), sorted."""
    a, b = _flat(old), _flat(new)
    missing = "(absent)"
    return [f"{key}: {a.get(key, missing)!r} -> {b.get(key, missing)!r}"
            for key in sorted(set(a) | set(b)) if a.get(key, missing) != b.get(key, missing)]


def restore_mismatch_hint(workdir: str, limit: int = 5) -> str:
    """For a checkpoint that does not restore under this run's config: the config keys changed since
    the run that wrote the workdir, and that run's config.json put back (this config never ran)."""
    path, previous = os.path.join(workdir, CONFIG_FILE), os.path.join(workdir, PREVIOUS_CONFIG_FILE)
    if not _CHANGED_CONFIG.get(workdir):  # this run's config is the one that wrote the checkpoints
        return ""
    try:
        changes = config_changes(json.loads(_read(previous)), json.loads(_read(path)))
    except (OSError, ValueError):  # no earlier config (or not JSON): nothing to compare
        return ""
    if jax.process_index() == 0:
        os.replace(previous, path)
        _CHANGED_CONFIG[workdir] = False
    if not changes:
        return ""
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return (f"; config keys changed since the run that wrote it: {'; '.join(changes[:limit])}{more} "
            f"(its {CONFIG_FILE} is kept; use another --workdir for the new config)")


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
    checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints,
                                mismatch_hint=functools.partial(restore_mismatch_hint, workdir))
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
