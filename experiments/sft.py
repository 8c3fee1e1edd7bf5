"""Stage 2 — supervised fine-tuning on labeler demonstrations (Ouyang et al. 2022 §3.5, App. C.1).

  python -m instructgpt_jax.main --config=experiments/sft.py:size=tiny --workdir=runs/p/sft
  ... --config.data.demonstrations.path=my_demos.jsonl      # {"prompt", "completion"} lines
  ... --config.sft.select_reward=runs/old/rm                # select the epoch by RM score (App. C.1)

Starts from "{workdir}/../pretrain" (the pretrain stage's workdir next to this one). Without a
demonstrations file, the simulated labeler (data/tasks.py) writes them (the embedded default).
"""
from instructgpt_jax import configs
from instructgpt_jax.stages import sft


def get_config(arg=None):
    arg = configs.parse_arg(arg, size="tiny", epochs=0, pretrain_mix=-1.0)
    c = configs.base_config("sft", arg.size)
    c.init.params = "{workdir}/../pretrain"
    c.labeler = sft.labeler_config(arg.size)
    c.generation = sft.generation_config()
    # App. C.1: 16 epochs, residual dropout 0.2, cosine decay to 10% of the lr with no warmup; the final
    # epoch is chosen by RM score on validation prompts (here: by validation loss unless an RM is given).
    c.sft = dict(
        epochs=arg.epochs or 16,
        prompt_loss_weight=0.0,  # GPT-1's auxiliary LM weight λ on the prompt (Radford et al. 2018 §3.2)
        # Fraction of each batch from pretraining data: InstructGPT's PPO starts from an SFT model trained with a
        # 10% mix (App. C); -1 = the size's default.
        pretrain_mix=arg.pretrain_mix if arg.pretrain_mix >= 0 else 0.0,
        select_reward="",  # RM workdir: choose the epoch by mean RM score of greedy validation responses
        select_prompts=256,
        gold_eval_prompts=256,  # task-suite validation prompts for the gold score of pretrained vs SFT; 0 = off
    )
    c.model.resid_dropout = 0.2
    c.optim.warmup_steps = 0
    c.optim.final_lr_ratio = 0.1
    if arg.size in configs.CPU_SIZES:
        # CPU: task examples fit in 40 tokens. A 0.7M-parameter model underfits rather than overfits, so no
        # dropout and a larger lr. Measured on `tiny` (greedy gold; pretrained 0.15): 2 epochs of 11.3k
        # demonstrations 0.54; InstructGPT's 16 epochs of 2.8k 0.77-0.79 (validation loss still falling: the
        # sft_epochs ablation) - the model learns to copy words from the prompt only with the longer schedule.
        c.train.seq_len = 40  # task prompts <= 19 tokens, answers <= 12 (+ EOS): 32 at most
        c.generation.max_new_tokens = 16
        c.model.resid_dropout = 0.0
        c.sft.epochs = arg.epochs or {"test": 2, "tiny": 16, "mini": 4}[arg.size]
        if arg.pretrain_mix < 0:  # 4 of 32 rows: the tiny model otherwise forgets its pretraining (LM loss 2.2 -> 6.9)
            c.sft.pretrain_mix = {"test": 0.0, "tiny": 0.125, "mini": 0.125}[arg.size]
        c.optim.lr = {"test": 1e-3, "tiny": 1e-3, "mini": 3e-4}[arg.size]
        c.train.log_every = 50
    else:
        # App. C.1: lr 9.65e-6 with batch 32 for 1.3B and 6B; 5.03e-6 with batch 8 for 175B.
        big = arg.size == "175b"
        c.model.dtype = "bfloat16"
        c.train.batch_size = 8 if big else 32
        c.optim.lr = 5.03e-6 if big else 9.65e-6
        c.train.log_every = 10
    return c
