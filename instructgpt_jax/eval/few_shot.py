"""Zero-, one- and few-shot evaluation in the GPT-3 style (Brown et al. 2020, §2): the task description,
k solved examples of the same family and the query, no gradient update; greedy answers, gold-scored.

As in GPT-3, k is capped by the context: a prompt whose k examples do not fit before the generated
tokens gets as many as fit (the mean k actually used is reported). Answers are one line, so a
response is cut at its first newline, GPT-3's stop sequence for such tasks, and counts as ended there.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from instructgpt_jax.data import tasks
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.eval import stats
from instructgpt_jax.eval.gold import gold_scores
from instructgpt_jax.stages import sft

STOP = "\n"


def fitted_prompt_ids(tokenizer, prompt: str, k: int, seed: int, max_prompt_tokens: int) -> tuple[list[int], int]:
    """Token ids of the k-shot prompt for `prompt` with the most examples (<= k) that fit in max_prompt_tokens,
    and that number of examples."""
    for shots in range(k, -1, -1):
        ids = tokenizer.encode(tasks.few_shot_prompt(prompt, shots, seed))
        if len(ids) <= max_prompt_tokens:
            return ids, shots
    raise ConfigError(f"even the zero-shot prompt {prompt!r} ({len(ids)} tokens) exceeds the {max_prompt_tokens} "
                      "prompt tokens left by model.max_len - generation.max_new_tokens")


def cut_at_stop(response: str, ended: bool) -> tuple[str, bool]:
    """The response up to the stop sequence; a stopped response has ended."""
    head, stop, _ = response.partition(STOP)
    return head, ended or bool(stop)


def few_shot_evaluation(sampler, params, tokenizer, prompts: Sequence[str], ks: Sequence[int], config, *,
                        max_prompt_tokens: int, seed: int = 0) -> dict:
    """Gold score (mean ± 95% CI) of greedy answers to `prompts` given k in-context examples, for each k.

    sampler: rl/sampling.make_sampler's; config.generation gives batch_size and top_p (sft.sample_texts).
    Prompt i draws its examples with seed + i, so k = 1's example is k = 2's first one."""
    results = {"prompts": len(prompts)}
    for k in ks:
        fitted = [fitted_prompt_ids(tokenizer, p, k, seed + i, max_prompt_tokens) for i, p in enumerate(prompts)]
        texts, ended = sft.sample_texts(sampler, params, tokenizer, [ids for ids, _ in fitted],
                                        jax.random.PRNGKey(seed), 0.0, config)
        answers, stopped = zip(*(cut_at_stop(t, e) for t, e in zip(texts, ended)))
        scores = gold_scores(prompts, answers, stopped)
        results[f"{k}_shot"] = {**stats.mean_ci(scores), "k": k, "mean_k": float(np.mean([s for _, s in fitted])),
                                "exact": float(np.mean(scores == 1.0)), "ended": float(np.mean(stopped)),
                                "examples": [{"prompt": p, "response": a} for p, a in zip(prompts[:3], answers[:3])]}
    return results
