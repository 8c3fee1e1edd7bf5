"""The whole InstructGPT recipe in one run: pretrain → SFT → RM → PPO and PPO-ptx, then one results table.

  python -m instructgpt_jax.main --config=experiments/pipeline.py:size=tiny --workdir=runs/pipeline
  ... --config.stages.ppo.ppo.kl_coef=0.05            # any stage's key, under stages.<name>
  ... :size=small                                      # a single GPU; GPT-3 sizes for pods

Each stage runs in WORKDIR/<stage> from its own experiment file (experiments/<stage>.py, same size) and reads
the previous stage's checkpoint by path; a finished stage is skipped on rerun. The final evaluation
(`evaluation`) compares the pretrained, SFT, PPO and PPO-ptx policies on held-out task prompts and writes
results.md, results.json, samples.md and plots/ into WORKDIR.
"""
import ml_collections

from instructgpt_jax import configs

STAGE_FILES = {"pretrain": ("pretrain", ""), "sft": ("sft", ""), "rm": ("rm", ""),
               "ppo": ("ppo", ",variant=ppo"), "ppo_ptx": ("ppo", ",variant=ppo_ptx")}


def get_config(arg=None):
    arg = configs.parse_arg(arg, size="tiny", attention="dense")
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.size = arg.size
    c.dry_run = False
    c.stages = ml_collections.ConfigDict()
    for stage, (name, extra) in STAGE_FILES.items():
        c.stages[stage] = configs.experiment_config(name, f"size={arg.size}{extra}")
    c.stages.pretrain.model.attention.layers = arg.attention
    # The final evaluation compares every policy on the same prompts; the stages' own comparisons are skipped.
    c.stages.sft.sft.gold_eval_prompts = 0
    c.stages.ppo.ppo.eval_prompts = c.stages.ppo_ptx.ppo.eval_prompts = 0
    c.run = tuple(STAGE_FILES)  # ablations may drop ppo or ppo_ptx
    # A stage's directory to share instead of WORKDIR/<stage> ("{workdir}/../shared/sft"): ablations run the
    # early stages once and vary the later ones.
    c.shared_stages = {name: "" for name in STAGE_FILES}
    c.evaluation = dict(
        prompts=2048,           # held-out test prompts of the task suite (paired across policies). At 512 the paired
                                # gold CI is ±0.014 on the tiny size, the size of PPO's gain at the pipeline's budget
                                # (README); 2048 halves it (evaluation 27 -> 55 s on 2 cores).
        few_shot_ks=(0, 1, 3),  # GPT-3's zero/one/few-shot, on the same families
        few_shot_prompts=128,   # 0 = skip
        examples=12,            # rows of samples.md
    )
    if arg.size == "tiny":
        # The 10-minute budget: the PPO experiment's 256 episodes x 40 x 4 epochs take ~3.5 min per stage, so the
        # pipeline runs PPO and PPO-ptx at 64 x 40, 1 epoch (~30 s each; README: the policy then barely moves).
        for stage in ("ppo", "ppo_ptx"):
            c.stages[stage].ppo.update(batch_size=64, minibatch_size=16, epochs=1)
    if arg.size == "test":  # a 64-token context leaves no room for in-context examples
        c.evaluation.update(prompts=32, few_shot_prompts=0, examples=4)
    if arg.size not in configs.CPU_SIZES:
        c.evaluation.few_shot_prompts = 1024
    return c
