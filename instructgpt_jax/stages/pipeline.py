"""The main job: every stage in order (each in WORKDIR/<stage>), then one comparison of the four policies.

A stage that finished writes DONE_FILE into its workdir (with its wall time) and is skipped on rerun; one
that was interrupted resumes from its own checkpoints. The final evaluation samples every policy on the same
held-out test prompts of the task suite, at the PPO temperature and greedily, and reports, against SFT:
gold score and win rate with bootstrap CIs, RM score, KL to SFT, held-out pretraining loss (the alignment
tax) and GPT-3-style zero/one/few-shot gold accuracy. Writes RESULTS_MD, RESULTS_JSON, SAMPLES_MD, plots/.

Ablations may run a prefix of the recipe (`run`: pretrain, then sft, rm, ppo/ppo_ptx, each with what it
starts from) and skip either evaluation: `evaluation.prompts=0` (the policy comparison, which needs SFT as
the baseline and the RM) and `evaluation.few_shot_prompts=0`; e.g. pretrain only with the k-shot evaluation.
"""
from __future__ import annotations

import os
import time

import jax

from instructgpt_jax.data import tasks
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.stages import common

ORDER = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")
POLICIES = ("pretrained", "sft", "ppo", "ppo_ptx")  # rows of the table; SFT is the baseline
POLICY_STAGE = {"pretrained": "pretrain", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx"}
NEEDS = {"sft": "pretrain", "rm": "sft", "ppo": "rm", "ppo_ptx": "rm"}  # the stage each one starts from
DONE_FILE = "stage_done.json"
RESULTS_MD, RESULTS_JSON, SAMPLES_MD = "results.md", "results.json", "samples.md"


def stage_done(stage_dir: str) -> dict | None:
    return common.read_json(os.path.join(stage_dir, DONE_FILE))


def stage_directory(config, workdir: str, name: str) -> str:
    """WORKDIR/<stage>, or, when `shared_stages.<stage>` names a directory, a link to it (ablations run the
    shared early stages once and vary only the later ones)."""
    from instructgpt_jax.stages import sft

    stage_dir = os.path.join(workdir, name)
    shared = config.shared_stages[name]
    if not shared:
        return stage_dir
    target = sft.resolve_stage_path(shared, workdir)
    if os.path.islink(stage_dir) and os.path.realpath(stage_dir) != os.path.realpath(target):
        raise ConfigError(f"shared_stages.{name}={shared!r}: {stage_dir} already links to {os.readlink(stage_dir)}")
    if not os.path.lexists(stage_dir):
        os.makedirs(target, exist_ok=True)
        os.makedirs(workdir, exist_ok=True)
        os.symlink(target, stage_dir)
    return stage_dir


def validate_run(config) -> None:
    """`run` holds pretrain and, for every other stage in it, the stage it starts from; the policy comparison
    (evaluation.prompts > 0) needs SFT (its baseline) and the RM (its score)."""
    run = tuple(config.run)
    if any(name not in ORDER for name in run) or "pretrain" not in run or any(
            NEEDS[name] not in run for name in run if name in NEEDS):
        raise ConfigError(f"run={run}: expected pretrain, then optionally sft, rm (after sft) and any of ppo, "
                          "ppo_ptx (after rm)")
    if config.evaluation.prompts and not {"sft", "rm"} <= set(run):
        raise ConfigError(f"evaluation.prompts={config.evaluation.prompts}: comparing policies needs sft and rm in "
                          f"run={run}; set evaluation.prompts=0 to skip the comparison")


def run_stages(config, workdir: str) -> dict:
    """Runs the stages of `config.run` not yet done; returns {stage: seconds} (this run's or the one that
    finished it)."""
    from instructgpt_jax import stages

    validate_run(config)
    seconds = {}
    for name in (n for n in ORDER if n in config.run):
        stage_dir = stage_directory(config, workdir, name)
        done = stage_done(stage_dir)
        if done is not None:
            common.log(f"pipeline: {name} already done ({done['seconds']:.0f} s), skipping")
            seconds[name] = done["seconds"]
            continue
        common.log(f"pipeline: {name} -> {stage_dir}")
        start = time.perf_counter()
        stages.run(config.stages[name], stage_dir)
        seconds[name] = time.perf_counter() - start
        common.save_json(os.path.join(stage_dir, DONE_FILE), {"seconds": seconds[name]})
    return seconds


def load_policies(config, workdir: str, abstract_policy) -> dict:
    """Params of each policy whose stage ran; the PPO stages' EMA weights when they kept one (what they
    evaluate)."""
    from instructgpt_jax.train import checkpoint

    def load(stage: str, key: str = "params"):
        return checkpoint.load_params(os.path.join(workdir, stage), abstract_policy, key=key)

    def final_policy(stage: str):
        if config.stages[stage].ppo.ema_decay:
            return load(stage, "ema_params")
        return checkpoint.load_params(os.path.join(workdir, stage), abstract_policy, subtree="policy")

    loaders = {"sft": lambda: load("sft"), "pretrained": lambda: load("pretrain"),
               "ppo": lambda: final_policy("ppo"), "ppo_ptx": lambda: final_policy("ppo_ptx")}
    return {name: loaders[name]() for name in POLICIES if POLICY_STAGE[name] in config.run}


def evaluate(config, workdir: str) -> tuple[dict, list]:
    """The final comparison, with the PPO stage's models, RM and sampler (its config decides shapes): the
    policies of the stages that ran, compared on evaluation.prompts (when > 0) and k-shot evaluated on
    evaluation.few_shot_prompts (when > 0). Returns (results, rows of samples.md)."""
    from instructgpt_jax.eval import few_shot
    from instructgpt_jax.models import gpt, heads
    from instructgpt_jax.rl import sampling
    from instructgpt_jax.stages import ppo
    from instructgpt_jax.train import sharding, steps

    c = config.stages.ppo_ptx  # the rollout and evaluation shapes (the same as ppo's)
    mesh = sharding.make_mesh(c)
    tokenizer = common.load_tokenizer(c)
    policy_model = steps.build_model(c)
    e = config.evaluation
    # The scorer reads the RM's params as the value model's (no PPO value is needed to compare policies).
    value_model = (heads.reward_model_of(os.path.join(workdir, "rm"), c.reward_model) if e.prompts
                   else heads.RewardModel(gpt.GPTConfig.from_config(c.reward_model)))
    init = ppo.init_state_fn(policy_model, value_model, steps.make_ppo_optimizer(c),
                             c.ppo.prompt_len + c.ppo.max_new_tokens, ema=c.ppo.ema_decay > 0)
    abstract, shardings = sharding.abstract_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(c.seed))
    policies = load_policies(config, workdir, abstract.params["policy"])
    ordered = {name: policies[name] for name in ("sft",) + tuple(p for p in POLICIES if p != "sft") if name in policies}
    results, rows = {}, []
    if e.prompts:
        reward_fn = heads.load_reward_model(os.path.join(workdir, "rm"), ppo.reward_config(c), mesh)
        trainer = ppo.Trainer(c, mesh, tokenizer, policy_model, value_model, shardings, policies["sft"], reward_fn)
        prompts = tasks.sample_prompts(e.prompts, "test", c.seed)
        results, samples = ppo.compare_policies(c, trainer, policy_model, ordered, prompts)
        rows = [{"prompt": prompts[i], **{name: samples[name, "sampled"]["texts"][i] for name in ordered},
                 **{f"{name} gold": float(samples[name, "sampled"]["gold"][i]) for name in ordered}}
                for i in range(min(e.examples, len(prompts)))]

    generation = c.generation
    sampler = sampling.make_sampler(c, policy_model, mesh, max_new_tokens=generation.max_new_tokens,
                                    params_shardings=shardings.params["policy"], eos_id=tokenizer.eos_id,
                                    pad_id=tokenizer.pad_id)
    shot_prompts = tasks.sample_prompts(e.few_shot_prompts, "test", c.seed + 1)
    for name, params in ordered.items() if e.few_shot_prompts else ():
        results.setdefault(name, {})["few_shot"] = few_shot.few_shot_evaluation(
            sampler, params, tokenizer, shot_prompts, e.few_shot_ks, c,
            max_prompt_tokens=c.model.max_len - generation.max_new_tokens, seed=c.seed)
    return results, rows


def fmt(value: dict, digits: int = 3) -> str:
    return f"{value['mean']:.{digits}f} ± {value['ci95']:.{digits}f}"


def results_table(results: dict, ks) -> str:
    """The markdown table of the README: one row per policy ("–" where an evaluation was skipped)."""
    head = ["policy", "gold (T=1)", "gold (greedy)", "win rate vs SFT [95% CI]", "RM score", "KL to SFT",
            "held-out LM loss"] + [f"{k}-shot" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in (p for p in POLICIES if p in results):
        row = results[name]
        sampled = row.get("sampled")
        if sampled is None:
            cells = [name] + ["–"] * 6
        else:
            if "vs_sft" in sampled:
                w = sampled["vs_sft"]["gold"]
                win = f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
            else:
                win = "(baseline)"
            cells = [name, fmt(sampled["gold"]), fmt(row["greedy"]["gold"]), win, fmt(sampled["rm_score"]),
                     fmt(sampled["kl_to_reference"], 2), f"{row['pretrain_loss']:.3f}"]
        cells += [f"{row['few_shot'][f'{k}_shot']['mean']:.3f}" if "few_shot" in row else "–" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict, seconds: dict, rows: list, ks) -> str:
    from instructgpt_jax.eval import samples as sample_tables

    table = results_table(results, ks)
    timing = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    compared = (f"{results['prompts']} held-out test prompts" if "prompts" in results
                else "No policy comparison (evaluation.prompts=0)")
    text = (f"# Pipeline results\n\n{compared} of the task suite; gold = the "
            f"gold labeler's score in [0, 1] (mean ± 95% CI); win rate: paired with SFT's response to the same "
            f"prompt, ties ½, bootstrap CI; RM score minus the RM's demonstration bias; KL to SFT in nats per "
            f"response; held-out LM loss on the pretraining mixture; k-shot: greedy gold score with k examples "
            f"in context.\n\n{table}\nStage times: {timing} (total {sum(seconds.values()):.0f} s).\n")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, RESULTS_MD), "w", encoding="utf-8") as f:
            f.write(text)
    common.save_json(os.path.join(workdir, RESULTS_JSON), {"policies": results, "stage_seconds": seconds})
    names = [n for n in rows[0] if n != "prompt" and not n.endswith(" gold")] if rows else []
    sample_tables.write_sample_table(
        os.path.join(workdir, SAMPLES_MD), "Sampled responses to held-out prompts (T=1)", [r["prompt"] for r in rows],
        {n: [r[n] for r in rows] for n in names}, {f"{n} gold": [r[f"{n} gold"] for r in rows] for n in names})
    return table


def run(config, workdir: str):
    from instructgpt_jax import plot

    if config.dry_run:
        raise ConfigError("dry_run: plan one stage at a time (e.g. --config=experiments/pretrain.py:size=175b "
                          "--config.dry_run=True); the pipeline runs them for real")
    workdir = common.prepare_workdir(config, workdir)
    seconds = run_stages(config, workdir)
    results, rows = {}, []
    if config.evaluation.prompts or config.evaluation.few_shot_prompts:
        common.log(f"pipeline: evaluating the policies of {tuple(config.run)} on held-out prompts")
        start = time.perf_counter()
        results, rows = evaluate(config, workdir)
        seconds["evaluation"] = time.perf_counter() - start
    table = write_results(workdir, results, seconds, rows, config.evaluation.few_shot_ks)
    if jax.process_index() == 0 and any(not config.shared_stages[name] for name in config.run):
        plot.plot_workdir(workdir)  # (a shared stage's curves are plotted where it ran)
    common.log("\n" + table + f"\nwritten: {os.path.join(workdir, RESULTS_MD)}, {RESULTS_JSON}, {SAMPLES_MD}, plots/")
    return results
