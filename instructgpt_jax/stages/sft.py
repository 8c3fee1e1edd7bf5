"""Stage 2: supervised fine-tuning on labeler demonstrations (Ouyang et al. 2022 §3.5, App. C.1).

Starts from the pretrained checkpoint (`init.params`), trains `sft.epochs` epochs on response tokens,
keeps a checkpoint per epoch and selects one: by the reward model's mean score of greedy responses to
validation prompts when `sft.select_reward` names an RM workdir (as InstructGPT did), else by
validation loss. The selected epoch is written to SELECTION_FILE, with every epoch's criteria (and its
greedy gold score when sft.gold_eval_prompts > 0: App. C.1's loss-vs-quality curve), and is the workdir's latest
checkpoint, so `checkpoint.load_params(sft_workdir, ...)` gives it. With the embedded default data, the
labeler's demonstrations are written to the data directory and read through the ordinary JSONL path,
and the pretrained and selected models' gold scores on validation prompts are written to GOLD_FILE.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os

import jax
import ml_collections
import numpy as np

from instructgpt_jax import configs
from instructgpt_jax.data import pipeline, sources, tasks
from instructgpt_jax.errors import CheckpointError, ConfigError
from instructgpt_jax.eval.gold import gold_scores
from instructgpt_jax.eval.stats import mean_ci
from instructgpt_jax.models import gpt
from instructgpt_jax.stages import common
from instructgpt_jax.train import checkpoint, loop, sharding, steps
from instructgpt_jax.train.state import make_optimizer

SELECTION_FILE = "selection.json"
GOLD_FILE = "gold_eval.json"


# ------------------------------------------------------------------------------ config helpers


def resolve_stage_path(path: str, workdir: str) -> str:
    """An earlier stage's workdir from config: "{workdir}/../pretrain" is resolved against this workdir."""
    return os.path.normpath(os.path.abspath(path.replace("{workdir}", os.path.abspath(workdir))))


def require_checkpoint(path: str, key: str) -> str:
    """Fails fast, naming the config key and directory, when an earlier stage's checkpoint is missing."""
    directory = checkpoint.checkpoint_dir(path)
    if not os.path.isdir(directory) or not any(name.isdigit() for name in os.listdir(directory)):
        raise CheckpointError(f"{key}={path!r}: no checkpoint in {directory} (has that stage run?)")
    return path


# else ~13k, InstructGPT's SFT set (Table 6). tiny: 3k demonstrations x 16 epochs beat 12k x 2 (sft_epochs ablation).
DEFAULT_DEMONSTRATIONS = {"test": 256, "tiny": 3000, "mini": 20000}


def labeler_config(size: str) -> ml_collections.ConfigDict:
    """`config.labeler`: the simulated labelers that write the embedded default data (data/tasks.py).
    SFT and RM configs of one size get the same demonstrations (the RM's bias is zeroed on their held-out part)."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        demo_error_rate=tasks.DEMO_ERROR_RATE,  # fraction of demonstrations with a plausible mistake
        noise=tasks.LABELER_NOISE,  # ranking noise; two labelers agree on ~73% of pairs (§3.4)
        num_demonstrations=DEFAULT_DEMONSTRATIONS.get(size, 13_000),  # task-suite train prompts
    ))


def generation_config() -> ml_collections.ConfigDict:
    """`config.generation`: KV-cache sampling for evaluation and for the RM's comparisons."""
    return ml_collections.ConfigDict(dict(max_new_tokens=24, batch_size=256, top_p=1.0))


def file_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tasks_code_digest() -> str:
    with open(inspect.getfile(tasks), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def cached_jsonl(data_cfg, kind: str, settings: dict, write) -> str:
    """<data.dir>/labeler/<kind>_<hash of settings>.jsonl, written once by write(path) (atomically)."""
    path = os.path.join(sources.data_dir(data_cfg), "labeler", f"{kind}_{file_digest(settings)}.jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        write(tmp)
        os.replace(tmp, path)
    return path


def default_demonstrations(config) -> str:
    """Labeler demonstrations on task-suite train prompts (deterministic, cached by their settings)."""
    lab = config.labeler
    settings = dict(n=lab.num_demonstrations, error_rate=lab.demo_error_rate, seed=lab.seed, code=tasks_code_digest())
    labeler = tasks.Labeler(error_rate=lab.demo_error_rate, noise=lab.noise, seed=lab.seed)
    return cached_jsonl(config.data, "demonstrations", settings, lambda path: tasks.write_demonstrations(
        path, lab.num_demonstrations, "train", labeler, seed=lab.seed))


def use_default_demonstrations(config) -> None:
    """Points data.demonstrations.path at the embedded default when it is empty."""
    if not config.data.demonstrations.path:
        config.data.demonstrations.path = default_demonstrations(config)
        common.log(f"demonstrations: embedded default {config.data.demonstrations.path}")


def validate_sft_config(config) -> None:
    s = config.sft
    if s.epochs < 1:
        raise ConfigError(f"sft.epochs={s.epochs}: must be >= 1")
    if s.prompt_loss_weight < 0:
        raise ConfigError(f"sft.prompt_loss_weight={s.prompt_loss_weight}: must be >= 0")
    if not 0 <= s.pretrain_mix < 1:
        raise ConfigError(f"sft.pretrain_mix={s.pretrain_mix}: expected in [0, 1)")
    rows, batch = pretrain_rows(config), config.train.batch_size
    if s.pretrain_mix and not 0 < rows < batch:
        raise ConfigError(f"sft.pretrain_mix={s.pretrain_mix} of train.batch_size={batch} "
                          "rounds to no pretraining rows or no demonstrations; change either")
    data, fsdp, _ = configs.validate_mesh(config, jax.device_count())
    if rows % (data * fsdp) or (batch - rows) % (data * fsdp):
        raise ConfigError(f"sft.pretrain_mix={s.pretrain_mix} splits train.batch_size={batch} into {batch - rows} "
                          f"demonstrations + {rows} pretraining rows; both must divide by mesh.data·mesh.fsdp="
                          f"{data * fsdp}")


def pretrain_rows(config) -> int:
    """Rows of each batch drawn from pretraining data (InstructGPT's 10% mix, App. C)."""
    return int(round(config.sft.pretrain_mix * config.train.batch_size))


def set_epochs(config, num_train: int) -> int:
    """train.steps = sft.epochs x steps per epoch; eval and checkpoint once per epoch. Returns steps/epoch."""
    per_epoch = max(1, num_train // (config.train.batch_size - pretrain_rows(config)))
    config.train.steps = config.sft.epochs * per_epoch
    config.optim.decay_steps = config.train.steps  # cosine to final_lr_ratio at the last step
    config.train.eval_every = config.train.checkpoint_every = per_epoch
    config.train.keep_checkpoints = config.sft.epochs + 1  # every epoch, plus the selected copy
    return per_epoch


# ------------------------------------------------------------------------------ batches


class MixedBatches:
    """SFT batches with `pretrain_tokens` from the pretraining mixture; checkpointable like grain's."""

    def __init__(self, demonstrations, pretraining):
        self.demonstrations, self.pretraining = demonstrations, pretraining

    def __next__(self):
        return {**next(self.demonstrations), "pretrain_tokens": next(self.pretraining)["tokens"]}

    def get_state(self) -> dict:
        return {"demonstrations": self.demonstrations.get_state(), "pretraining": self.pretraining.get_state()}

    def set_state(self, state: dict) -> None:
        self.demonstrations.set_state(state["demonstrations"])
        self.pretraining.set_state(state["pretraining"])


def train_batches(config, tokenizer):
    kw = dict(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    rows, seq_len = pretrain_rows(config), config.train.seq_len
    demos = pipeline.sft_batches(config.data, tokenizer, seq_len, config.train.batch_size - rows, "train", **kw)
    if not rows:
        return demos
    return MixedBatches(demos, pipeline.lm_batches(config.data, tokenizer, seq_len, rows, "train", **kw))


def validation_loss(eval_step, config, tokenizer, to_device, n_batches: int, params) -> float:
    """Mean response-token loss over the first n_batches validation batches (the same every call)."""
    it = pipeline.sft_batches(config.data, tokenizer, config.train.seq_len, config.train.batch_size, "validation",
                              seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    return float(np.mean([float(eval_step(params, to_device(next(it)))["loss"]) for _ in range(n_batches)]))


# ------------------------------------------------------------------------------ generation, scores


def task_prompt_ids(tokenizer, prompts) -> list[list[int]]:
    return [tokenizer.encode(p) for p in prompts]


def generate(sampler, params, prompt_ids, rng, temperature: float, config):
    """Runs the KV-cache sampler over prompts in fixed-size batches (the last one padded by repeating,
    so each prompt length compiles once). Yields (start, count, prompt_mask, output) per batch."""
    from instructgpt_jax.rl import sampling

    size = config.generation.batch_size
    length = max(len(ids) for ids in prompt_ids)
    for i, start in enumerate(range(0, len(prompt_ids), size)):
        chunk = prompt_ids[start:start + size]
        tokens, mask = sampling.left_pad(chunk + [chunk[0]] * (size - len(chunk)), length)
        output = sampler(params, tokens, mask, jax.random.fold_in(rng, i), np.float32(temperature),
                         np.float32(config.generation.top_p))
        yield start, len(chunk), mask, output


def sample_texts(sampler, params, tokenizer, prompt_ids, rng, temperature, config) -> tuple[list[str], list[bool]]:
    """Decoded responses (up to EOS) and ended flags for each prompt."""
    from instructgpt_jax.rl import sampling

    texts, ended = [], []
    for _, count, _, output in generate(sampler, params, prompt_ids, rng, temperature, config):
        t, e = sampling.decode_responses(tokenizer, output)
        texts += t[:count]
        ended += e[:count]
    return texts, ended


def reward_of_samples(reward_fn, prompt_mask, output):
    """RM scores [B] of sampled responses as the sampler returns them (left-padded prompt + response),
    read at each response's last token (its EOS, or the last token of one that never ended)."""
    from instructgpt_jax.rl import sampling

    valid = np.concatenate([np.asarray(prompt_mask), np.asarray(output.response_mask) > 0], axis=1)
    last = prompt_mask.shape[1] + np.asarray(output.lengths) - 1
    first = np.full(len(last), prompt_mask.shape[1], np.int32)
    return np.asarray(reward_fn(output.tokens, last, sampling.positions_from_mask(valid), valid, first))


def mean_greedy_reward(sampler, reward_fn, params, prompt_ids, config) -> float:
    """Mean RM score of greedy responses: InstructGPT's SFT selection criterion (App. C.1)."""
    scores = []
    for _, count, mask, output in generate(sampler, params, prompt_ids, jax.random.PRNGKey(0), 0.0, config):
        scores += list(reward_of_samples(reward_fn, mask, output)[:count])
    return float(np.mean(scores))


def gold_eval_prompts(config, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The sft.gold_eval_prompts task-suite validation prompts and their token ids."""
    prompts = tasks.sample_prompts(config.sft.gold_eval_prompts, "validation", config.seed)
    return prompts, task_prompt_ids(tokenizer, prompts)


def gold_of_responses(config, sampler, tokenizer, params, prompts, ids, temperature: float):
    """(gold scores [N], texts, ended) of responses to prompts at temperature (0 = greedy)."""
    texts, ended = sample_texts(sampler, params, tokenizer, ids, jax.random.PRNGKey(config.seed + 1), temperature,
                                config)
    return gold_scores(prompts, texts, ended), texts, ended


def gold_evaluation(config, sampler, tokenizer, named_params: dict) -> dict:
    """Mean gold score (± 95% CI) of greedy and sampled (T=1) responses to task-suite validation prompts,
    for each model, and the paired difference of the last model minus the first."""
    prompts, ids = gold_eval_prompts(config, tokenizer)
    results, scores = {"prompts": len(prompts)}, {}
    for name, params in named_params.items():
        for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            scores[name, mode], texts, ended = gold_of_responses(config, sampler, tokenizer, params, prompts, ids,
                                                                 temperature)
            results[f"{name}_{mode}"] = {**mean_ci(scores[name, mode]), "ended": float(np.mean(ended))}
            if mode == "greedy":
                results[f"{name}_examples"] = [{"prompt": p, "response": t} for p, t in zip(prompts[:4], texts[:4])]
    names = list(named_params)
    for mode in ("greedy", "sampled") if len(names) > 1 else ():
        results[f"{names[-1]}_minus_{names[0]}_{mode}"] = mean_ci(scores[names[-1], mode] - scores[names[0], mode])
    return results


# ------------------------------------------------------------------------------ epoch selection


def select_epoch(config, checkpointer, abstract_state, per_epoch: int, criteria: dict) -> dict:
    """Evaluates every epoch's checkpoint and makes the best one the workdir's latest checkpoint.

    criteria: name -> fn(params) -> float; "reward" (higher is better) decides when present, else
    "validation_loss" (lower is better); others (the gold score) are only recorded in each epoch's row.
    When the best is not the last epoch, its state is saved again as step last + 1, so load_params(workdir)
    returns the selected model."""
    epochs = []
    for epoch in range(1, config.sft.epochs + 1):
        state, _ = checkpointer.restore(abstract_state, epoch * per_epoch)
        row = {"epoch": epoch, "step": epoch * per_epoch, **{k: fn(state.params) for k, fn in criteria.items()}}
        common.log(f"[sft] epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k in criteria))
        epochs.append(row)
    by = "reward" if "reward" in criteria else "validation_loss"
    best = max(epochs, key=lambda r: r[by] if by == "reward" else -r[by])
    last = epochs[-1]["step"]
    checkpoint_step = best["step"]
    if checkpoint_step != last:
        checkpoint_step = last + 1
        if checkpoint_step in checkpointer.manager.all_steps():  # a copy from an interrupted earlier selection
            checkpointer.manager.delete(checkpoint_step)
        checkpointer.save(checkpoint_step, checkpointer.restore(abstract_state, best["step"])[0])
        checkpointer.wait()
    return {"selected_epoch": best["epoch"], "selected_step": best["step"], "checkpoint_step": checkpoint_step,
            "by": by, "epochs": epochs}


def read_selection(workdir: str) -> dict | None:
    return common.read_json(os.path.join(workdir, SELECTION_FILE))


def selection_criteria(config, workdir, mesh, model, tokenizer, built, eval_step, to_device, sampler) -> dict:
    """Validation loss always; the RM's mean greedy score on validation prompts when sft.select_reward is set;
    the mean gold score of greedy responses to the gold_evaluation prompts when sft.gold_eval_prompts > 0
    (recorded per epoch, never selects: the gold labeler stands in for humans the selection cannot ask)."""
    n_batches = max(1, len(built.split("validation")) // config.train.batch_size)
    loss = functools.partial(validation_loss, eval_step, config, tokenizer, to_device, n_batches)
    criteria = {"validation_loss": loss}
    if config.sft.select_reward:
        from instructgpt_jax.models import heads

        reward_fn = heads.load_reward_model(resolve_stage_path(config.sft.select_reward, workdir), config, mesh)
        prompts = sorted({r["prompt"] for r in sources.read_examples(built, "validation")})
        ids = task_prompt_ids(tokenizer, prompts[: config.sft.select_prompts])
        criteria["reward"] = lambda params: mean_greedy_reward(sampler, reward_fn, params, ids, config)
    if config.sft.gold_eval_prompts:
        gold_prompts, gold_ids = gold_eval_prompts(config, tokenizer)
        criteria["gold"] = lambda params: float(np.mean(
            gold_of_responses(config, sampler, tokenizer, params, gold_prompts, gold_ids, 0.0)[0]))
    return criteria


# ------------------------------------------------------------------------------ the stage


def abstract_batch(config) -> dict:
    b, t, rows = config.train.batch_size, config.train.seq_len, pretrain_rows(config)
    batch = {"tokens": jax.ShapeDtypeStruct((b - rows, t + 1), np.int32),
             "loss_mask": jax.ShapeDtypeStruct((b - rows, t), np.float32)}
    if rows:
        batch["pretrain_tokens"] = jax.ShapeDtypeStruct((rows, t + 1), np.int32)
    return batch


def run(config, workdir: str):
    validate_sft_config(config)
    model = steps.build_model(config)
    init = steps.init_state_fn(model, make_optimizer(config.optim), config.train.seq_len)
    if config.dry_run:
        return common.dry_run(config, init, lambda mesh, sh: steps.make_sft_step(config, model, mesh, sh),
                              abstract_batch(config))
    init_path = resolve_stage_path(config.init.params, workdir) if config.init.params else ""
    if init_path:
        require_checkpoint(init_path, "init.params")
    use_default_demonstrations(config)
    built = sources.build_jsonl_source("demonstrations", config.data)
    per_epoch = set_epochs(config, len(built.split("train")))
    workdir, mesh, writer, checkpointer = common.setup(config, workdir)
    common.log(f"sft: {len(built.split('train'))} train demonstrations, {config.sft.epochs} epochs x {per_epoch} steps")
    tokenizer = common.load_tokenizer(config)
    rules, rng = sharding.rules(config), jax.random.PRNGKey(config.seed)
    abstract_state, state_shardings = sharding.abstract_init(init, mesh, rules, rng)

    def initial_params():
        return checkpoint.load_params(init_path, abstract_state.params)

    def fresh_state():
        state = sharding.sharded_init(init, mesh, rules, rng)[0]
        if not init_path:
            common.log("sft: init.params is empty: fine-tuning a randomly initialised model")
            return state
        common.log(f"sft: starting from {init_path}")
        return state.replace(params=initial_params())

    to_device = functools.partial(pipeline.to_global_batch, sharding=sharding.batch_sharding(mesh))
    eval_step = steps.make_sft_eval_step(config, model, mesh, state_shardings.params)
    from instructgpt_jax.rl import sampling

    sampler = sampling.make_sampler(config, model, mesh, max_new_tokens=config.generation.max_new_tokens,
                                    params_shardings=state_shardings.params, eos_id=tokenizer.eos_id,
                                    pad_id=tokenizer.pad_id)
    selection = read_selection(workdir)
    if selection is None or selection["checkpoint_step"] != checkpointer.latest_step():
        state, data_state, start = loop.init_or_restore(checkpointer, init=fresh_state, abstract=lambda: abstract_state,
                                                        log=common.log)
        batches = train_batches(config, tokenizer)
        if data_state:
            batches.set_state(data_state)
        criteria = selection_criteria(config, workdir, mesh, model, tokenizer, built, eval_step, to_device, sampler)
        tokens = config.train.batch_size * config.train.seq_len
        cfg = gpt.GPTConfig.from_config(config.model)
        loop.train_loop(
            config=config, state=state, train_step=steps.make_sft_step(config, model, mesh, state_shardings),
            batches=batches, to_device=to_device, checkpointer=checkpointer, writer=writer, start_step=start,
            eval_fn=lambda s: {"loss": criteria["validation_loss"](s.params)}, tokens_per_batch=tokens,
            flops_per_batch=tokens * gpt.train_flops_per_token(cfg, config.train.seq_len))
        selection = select_epoch(config, checkpointer, abstract_state, per_epoch, criteria)
        common.save_json(os.path.join(workdir, SELECTION_FILE), selection)
    common.log(f"sft: selected epoch {selection['selected_epoch']} by {selection['by']} "
               f"(checkpoint {checkpointer.directory}/{selection['checkpoint_step']})")
    result = {"selection": selection}
    if config.sft.gold_eval_prompts:
        selected = checkpointer.restore(abstract_state)[0].params
        models = {"pretrained": initial_params(), "sft": selected} if init_path else {"sft": selected}
        result["gold"] = gold_evaluation(config, sampler, tokenizer, models)
        common.save_json(os.path.join(workdir, GOLD_FILE), result["gold"])
        common.log("sft: gold score on validation prompts: " + ", ".join(
            f"{k} {v['mean']:.3f} ± {v['ci95']:.3f}" for k, v in result["gold"].items() if isinstance(v, dict)))
    checkpointer.close()
    writer.close()
    return result
