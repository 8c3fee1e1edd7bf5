"""Stage 3: the reward model (Ouyang et al. 2022 §3.5, App. C.2).

The SFT model's trunk (`init.params`) with a scalar head, trained on prompts with K ranked responses
each: all B·K responses go through the trunk in one forward pass and the C(K,2) pairs of a prompt
form one element of the loss (eq. 1). Afterwards a bias is stored so that the labelers'
demonstrations on held-out prompts score 0 on average (§3.5); `heads.load_reward_model` applies it.
Held-out pairwise accuracy against the labels and agreement with the gold scorer are written to
EVAL_FILE next to the labelers' own agreement (the ceiling, `tasks.labeler_agreement`).

Embedded default comparisons (when data.comparisons.path is empty): K responses per train prompt
sampled at temperature 1 from the SFT policy with the KV-cache sampler (`rm.samples="policy"`), or
drawn by `tasks.simulated_policy_samples` (`"simulated"`), ranked by the simulated labeler, ties
dropped, written to JSONL in the data directory and read back through the ordinary path.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax.data import pipeline, sources, tasks
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.eval.best_of_n import best_of_n_curve, format_curve
from instructgpt_jax.eval.gold import gold_scores
from instructgpt_jax.eval.rm_accuracy import pair_agreement, score_sequences
from instructgpt_jax.models import gpt, heads
from instructgpt_jax.stages import common, sft
from instructgpt_jax.train import checkpoint, loop, sharding, steps
from instructgpt_jax.train.state import FROZEN_KEY, make_optimizer

EVAL_FILE = "rm_eval.json"
SAMPLE_KINDS = ("policy", "simulated")


def validate_rm_config(config) -> None:
    r = config.rm
    if not tasks.MIN_RESPONSES <= r.max_responses:
        raise ConfigError(f"rm.max_responses={r.max_responses}: a comparison needs K >= {tasks.MIN_RESPONSES}")
    if not tasks.MIN_RESPONSES <= r.responses_per_prompt <= min(r.max_responses, tasks.MAX_RESPONSES):
        raise ConfigError(f"rm.responses_per_prompt={r.responses_per_prompt}: expected {tasks.MIN_RESPONSES}.."
                          f"min(rm.max_responses={r.max_responses}, {tasks.MAX_RESPONSES})")
    if r.samples not in SAMPLE_KINDS:
        raise ConfigError(f"rm.samples={r.samples!r}: expected one of {SAMPLE_KINDS}")
    if r.score not in heads.SCORES:
        raise ConfigError(f"rm.score={r.score!r}: expected one of {heads.SCORES}")
    if r.epochs <= 0 or r.num_prompts <= 0:
        raise ConfigError(f"rm.epochs={r.epochs} and rm.num_prompts={r.num_prompts}: must be positive")
    if r.best_of_n_prompts < 0 or (r.best_of_n_prompts and (not r.best_of_n or min(r.best_of_n) < 1)):
        raise ConfigError(f"rm.best_of_n_prompts={r.best_of_n_prompts} (0 = off) with rm.best_of_n={tuple(r.best_of_n)}: "
                          "needs prompts >= 0 and sample counts k >= 1")
    if r.best_of_n_prompts and not r.sample_policy:
        raise ConfigError("rm.best_of_n_prompts > 0 samples the policy in rm.sample_policy; none given")
    if not config.init.params:
        raise ConfigError("init.params: the reward model starts from an SFT (or pretrained) workdir; none given")


# ------------------------------------------------------------------------------ default comparisons


def ranked_record(prompt: str, responses, ended, labeler: tasks.Labeler) -> dict | None:
    """{"prompt", "responses" best first, "ended"} as the labeler ranks them (identical strings and ties
    dropped, as tasks.comparison_record); None when fewer than 2 distinct responses remain."""
    order = labeler.rank(prompt, responses, ended)
    if len(order) < tasks.MIN_RESPONSES:
        return None
    return {"prompt": prompt, "responses": [responses[i] for i in order], "ended": [bool(ended[i]) for i in order]}


def simulated_samples(prompts, k: int, seed: int):
    """K responses per prompt from tasks.simulated_policy_samples, as completions (with the prefix)."""
    rng = np.random.default_rng(seed)
    for prompt in prompts:
        answers, ended = tasks.simulated_policy_samples(prompt, k, rng)
        yield [tasks.COMPLETION_PREFIX + a for a in answers], ended


def policy_sampler(config, mesh, tokenizer, policy_dir: str):
    """(KV-cache sampler, params) of the policy in policy_dir, for generation.max_new_tokens new tokens."""
    from instructgpt_jax.rl import sampling

    model = steps.build_model(config)
    tokens = jnp.zeros((1, config.train.seq_len), jnp.int32)
    abstract, shardings = sharding.abstract_init(lambda rng: model.init({"params": rng}, tokens)["params"], mesh,
                                                 sharding.rules(config), jax.random.PRNGKey(0))
    params = checkpoint.load_params(policy_dir, abstract)
    sampler = sampling.make_sampler(config, model, mesh, max_new_tokens=config.generation.max_new_tokens,
                                    params_shardings=shardings, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return sampler, params


def policy_samples(config, mesh, tokenizer, policy_dir: str, prompts, k: int):
    """K responses per prompt sampled from the policy in policy_dir at rm.temperature (KV-cache sampler)."""
    sampler, params = policy_sampler(config, mesh, tokenizer, policy_dir)
    ids = [tokenizer.encode(p) for p in prompts for _ in range(k)]
    texts, ended = sft.sample_texts(sampler, params, tokenizer, ids, jax.random.PRNGKey(config.labeler.seed + 7),
                                    config.rm.temperature, config)
    for i in range(len(prompts)):
        yield texts[i * k:(i + 1) * k], ended[i * k:(i + 1) * k]


def policy_identity(policy_dir: str) -> dict:
    """What the cached comparisons depend on: the policy's directory, latest step and its write time."""
    directory = checkpoint.checkpoint_dir(policy_dir)
    steps_there = sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(directory) else []
    if not steps_there:
        raise ConfigError(f"rm.sample_policy={policy_dir!r}: no checkpoint in {directory} (has SFT run?)")
    return {"policy": policy_dir, "step": steps_there[-1],
            "mtime": os.stat(os.path.join(directory, str(steps_there[-1]))).st_mtime_ns}


def default_comparisons(config, workdir: str, mesh, tokenizer) -> str:
    """Writes (once per settings and policy) the embedded default comparisons; returns the JSONL path."""
    r, lab = config.rm, config.labeler
    settings = dict(samples=r.samples, n=r.num_prompts, k=r.responses_per_prompt, seed=lab.seed, noise=lab.noise,
                    code=sft.tasks_code_digest())
    if r.samples == "policy":
        policy_dir = sft.resolve_stage_path(r.sample_policy, workdir)
        settings.update(policy_identity(policy_dir), temperature=r.temperature, generation=dict(config.generation))

    def write(path):
        prompts = tasks.sample_prompts(r.num_prompts, "train", lab.seed)
        if r.samples == "policy":
            common.log(f"rm: sampling {r.responses_per_prompt} responses to each of {len(prompts)} prompts "
                       f"from {policy_dir}")
            samples = policy_samples(config, mesh, tokenizer, policy_dir, prompts, r.responses_per_prompt)
        else:
            samples = simulated_samples(prompts, r.responses_per_prompt, lab.seed)
        labeler = tasks.Labeler(error_rate=lab.demo_error_rate, noise=lab.noise, seed=lab.seed + 1)
        records = (ranked_record(p, resp, ended, labeler) for p, (resp, ended) in zip(prompts, samples))
        tasks.write_jsonl(path, (rec for rec in records if rec is not None))

    return sft.cached_jsonl(config.data, f"comparisons_{r.samples}", settings, write)


# ------------------------------------------------------------------------------ scoring, metrics


def make_score_fn(model: heads.RewardModel, config, mesh):
    """Jitted (params, tokens [N, T], last_index [N], response_start [N]) -> raw scores [N] under the config's
    sharding rules."""
    fn = jax.jit(lambda params, tokens, last, first: model.apply({"params": params}, tokens, last,
                                                                 response_start=first))
    return sharding.with_sharding_context(fn, mesh, sharding.rules(config))


def held_out_metrics(config, score_fn, params, tokenizer, built) -> dict:
    """Pairwise accuracy on held-out comparisons (vs the labels), agreement with the gold scorer, and
    how often the labels themselves agree with gold, over non-identical (and, for gold, non-tied) pairs."""
    seq_len, k_max = config.train.seq_len, config.rm.max_responses
    kept_records, sequences, starts = [], [], []
    for record in pipeline.comparison_records(built, "validation"):
        example, kept = pipeline.tokenize_comparison(record, tokenizer, seq_len, k_max, "held-out comparison")
        if example is None:
            continue
        kept_records.append({"prompt": record["prompt"], "responses": [record["responses"][i] for i in kept],
                             "ended": [record["ended"][i] for i in kept]})
        sequences += [list(example["tokens"][i, :example["last_index"][i] + 1]) for i in range(len(kept))]
        starts += list(example["response_start"][:len(kept)])
    scores = score_sequences(score_fn, params, sequences, starts, seq_len)
    counts = np.zeros((3, 2), np.int64)  # rows: RM vs labels, RM vs gold, labels vs gold
    offset = 0
    for rec in kept_records:
        s = scores[offset:offset + len(rec["responses"])]
        offset += len(rec["responses"])
        label_rank = -np.arange(len(s), dtype=np.float64)  # best first
        counts[0] += pair_agreement(s, label_rank, rec["responses"])
        try:
            gold = sft.gold_scores([rec["prompt"]] * len(s), rec["responses"], rec["ended"])
        except ValueError:  # not a task-suite prompt: no gold score
            continue
        counts[1] += pair_agreement(s, gold, rec["responses"])
        counts[2] += pair_agreement(label_rank, gold, rec["responses"])
    rate = lambda row: float(row[0] / row[1]) if row[1] else float("nan")  # noqa: E731
    return {"prompts": len(kept_records), "pairs": int(counts[0, 1]), "accuracy": rate(counts[0]),
            "gold_pairs": int(counts[1, 1]), "gold_agreement": rate(counts[1]),
            "labels_gold_agreement": rate(counts[2])}


def labeler_ceiling(config) -> float:
    """How often two labelers with this config's noise agree: the ceiling reported beside RM accuracy."""
    return tasks.labeler_agreement(n_prompts=config.rm.ceiling_prompts, k=config.rm.responses_per_prompt,
                                   noise=config.labeler.noise)


def demonstration_sequences(config, tokenizer) -> tuple[list[list[int]], list[int]]:
    """(prompt + completion + EOS, prompt length) of the held-out (validation) demonstrations that fit in
    seq_len."""
    built = sources.build_jsonl_source("demonstrations", config.data)
    sequences, starts = [], []
    for d in sources.read_examples(built, "validation"):
        prompt = tokenizer.encode(d["prompt"])
        ids = pipeline.response_tokens(prompt, tokenizer.encode(d["completion"]), True, tokenizer.eos_id)
        if len(ids) <= config.train.seq_len:
            sequences.append(ids)
            starts.append(len(prompt))
    return sequences, starts


def best_of_n_evaluation(config, mesh, tokenizer, reward_fn: heads.RewardFunction, policy_dir: str) -> dict:
    """Best-of-k gold on held-out task prompts: n = max(rm.best_of_n) samples per prompt from the policy
    whose samples were ranked (at rm.temperature), picked by this reward model (eval/best_of_n.py)."""
    from instructgpt_jax.rl import sampling

    ks, n_prompts = tuple(config.rm.best_of_n), config.rm.best_of_n_prompts
    prompts = tasks.sample_prompts(n_prompts, "validation", config.seed)
    sampler, params = policy_sampler(config, mesh, tokenizer, policy_dir)
    ids = sft.task_prompt_ids(tokenizer, prompts)
    scores, gold = np.zeros((n_prompts, max(ks))), np.zeros((n_prompts, max(ks)))
    for j in range(max(ks)):
        rng, texts, ended = jax.random.PRNGKey(config.seed + 1000 + j), [], []
        for start, count, mask, output in sft.generate(sampler, params, ids, rng, config.rm.temperature, config):
            scores[start:start + count, j] = sft.reward_of_samples(reward_fn, mask, output)[:count]
            t, e = sampling.decode_responses(tokenizer, output)
            texts += t[:count]
            ended += e[:count]
        gold[:, j] = gold_scores(prompts, texts, ended)
    return {"prompts": n_prompts, "policy": policy_dir, "curve": best_of_n_curve(scores, gold, ks)}


# ------------------------------------------------------------------------------ the stage


def abstract_batch(config) -> dict:
    b, k, t = config.train.batch_size, config.rm.max_responses, config.train.seq_len
    return {"tokens": jax.ShapeDtypeStruct((b, k, t), np.int32), "last_index": jax.ShapeDtypeStruct((b, k), np.int32),
            "response_start": jax.ShapeDtypeStruct((b, k), np.int32), "num_responses": jax.ShapeDtypeStruct((b,), np.int32)}


def rm_eval(eval_step, batches, n_batches: int, to_device, state) -> dict:
    it = batches()
    metrics = [jax.device_get(eval_step(state.params, to_device(next(it)))) for _ in range(n_batches)]
    return {k: float(np.mean([m[k] for m in metrics])) for k in ("loss", "accuracy", "mean_score")}


def run(config, workdir: str):
    validate_rm_config(config)
    model = heads.RewardModel(gpt.GPTConfig.from_config(config.model), score=config.rm.score)
    init = steps.init_state_fn(model, make_optimizer(config.optim), config.train.seq_len)
    if config.dry_run:
        return common.dry_run(config, init, lambda mesh, sh: steps.make_rm_step(config, model, mesh, sh),
                              abstract_batch(config))
    sft.use_default_demonstrations(config)  # the demonstrations whose mean score the bias zeroes
    init_path = sft.require_checkpoint(sft.resolve_stage_path(config.init.params, workdir), "init.params")
    if (config.rm.samples == "policy" and not config.data.comparisons.path) or config.rm.best_of_n_prompts:
        sft.require_checkpoint(sft.resolve_stage_path(config.rm.sample_policy, workdir), "rm.sample_policy")
    workdir, mesh, writer, checkpointer = common.setup(config, workdir)
    tokenizer = common.load_tokenizer(config)
    if not config.data.comparisons.path:
        config.data.comparisons.path = default_comparisons(config, workdir, mesh, tokenizer)
        common.log(f"comparisons: embedded default {config.data.comparisons.path}")
    built = sources.build_jsonl_source("comparisons", config.data)
    batches = functools.partial(pipeline.rm_batches, config.data, tokenizer, config.train.seq_len,
                                config.train.batch_size, config.rm.max_responses, seed=config.seed,
                                process_index=jax.process_index(), process_count=jax.process_count())
    per_epoch = max(1, len(built.split("train")) // config.train.batch_size)
    config.train.steps = config.rm.epochs * per_epoch  # App. C.2: one epoch; more overfit
    config.optim.decay_steps = config.train.steps
    common.prepare_workdir(config, workdir, update=True)  # config.json with the resolved data path and steps
    common.log(f"rm: {len(built.split('train'))} train prompts, {config.rm.epochs} epoch(s) x {per_epoch} steps")

    rules, rng = sharding.rules(config), jax.random.PRNGKey(config.seed)
    abstract_state, state_shardings = sharding.abstract_init(init, mesh, rules, rng)

    def fresh_state():
        state = sharding.sharded_init(init, mesh, rules, rng)[0]
        common.log(f"rm: trunk from {init_path}")
        trunk = checkpoint.load_params(init_path, abstract_state.params["trunk"])
        params = {**state.params, "trunk": trunk}
        if FROZEN_KEY in params:  # score="final_token+sft_loglik": the SFT model, kept as loaded
            params[FROZEN_KEY] = jax.tree.map(jnp.copy, trunk)  # own buffers: the step donates the state
        return state.replace(params=params)

    state, data_state, start = loop.init_or_restore(checkpointer, init=fresh_state, abstract=lambda: abstract_state,
                                                    log=common.log)
    train_batches = batches(split="train")
    if data_state:
        train_batches.set_state(data_state)
    to_device = functools.partial(pipeline.to_global_batch, sharding=sharding.batch_sharding(mesh))
    eval_step = steps.make_rm_eval_step(config, model, mesh, state_shardings.params)
    n_eval = max(1, min(config.train.eval_batches, len(built.split("validation")) // config.train.batch_size))
    eval_fn = functools.partial(rm_eval, eval_step, functools.partial(batches, split="validation"), n_eval, to_device)
    sequences = config.train.batch_size * config.rm.max_responses
    state = loop.train_loop(
        config=config, state=state, train_step=steps.make_rm_step(config, model, mesh, state_shardings),
        batches=train_batches, to_device=to_device, checkpointer=checkpointer, writer=writer, start_step=start,
        eval_fn=eval_fn, tokens_per_batch=sequences * config.train.seq_len)

    score_fn = make_score_fn(model, config, mesh)
    demos, demo_starts = demonstration_sequences(config, tokenizer)
    demo_scores = score_sequences(score_fn, state.params, demos, demo_starts, config.train.seq_len)
    bias = float(demo_scores.mean())
    heads.write_bias(workdir, bias, config.rm.score, demonstrations=len(demo_scores), step=int(state.step),
                     source=config.data.demonstrations.path)
    metrics = held_out_metrics(config, score_fn, state.params, tokenizer, built)
    metrics.update(bias=bias, demonstrations_mean_after_bias=float((demo_scores - bias).mean()),
                   labeler_agreement_ceiling=labeler_ceiling(config))
    if config.rm.best_of_n_prompts:
        policy_dir = sft.resolve_stage_path(config.rm.sample_policy, workdir)
        reward_fn = heads.RewardFunction(model=model, params=state.params, bias=bias)
        metrics["best_of_n"] = best_of_n_evaluation(config, mesh, tokenizer, reward_fn, policy_dir)
        common.log(f"rm: best-of-k gold of {policy_dir} on {config.rm.best_of_n_prompts} held-out prompts, "
                   f"picked by this RM: {format_curve(metrics['best_of_n']['curve'])}")
    common.save_json(os.path.join(workdir, EVAL_FILE), metrics)
    scalars = {k: v for k, v in metrics.items() if k != "best_of_n"}
    for row in metrics.get("best_of_n", {}).get("curve", []):
        scalars[f"best_of_{row['k']}_gold"] = row["gold"]
    writer.write(int(state.step), scalars, "held_out", echo=False)
    common.log(f"rm: held-out pairwise accuracy {metrics['accuracy']:.3f} over {metrics['pairs']} pairs; "
               f"agreement with gold {metrics['gold_agreement']:.3f} ({metrics['gold_pairs']} non-tied pairs; "
               f"the labels themselves {metrics['labels_gold_agreement']:.3f}); two labelers agree on "
               f"{metrics['labeler_agreement_ceiling']:.3f}; bias {bias:+.4f} over {len(demo_scores)} demonstrations")
    checkpointer.close()
    writer.close()
    return metrics
