"""Gold scores and policy-vs-baseline comparisons (InstructGPT §4.1: win rate against a baseline).

The gold scorer is the task suite's labeler (`data/tasks.gold_score`, true quality in [0, 1]); an RM
can judge the same pairs from its scores. Both give the same `stats.compare` summary.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from instructgpt_jax.data import tasks
from instructgpt_jax.eval import stats


def gold_scores(prompts, responses, ended) -> np.ndarray:
    return np.array([tasks.gold_score(p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)])


def mean_by_family(prompts: Sequence[str], scores) -> dict[str, float]:
    """Mean score per task family (in the suite's family order) of task-suite prompts."""
    families = [tasks.task_family(p) for p in prompts]
    scores = np.asarray(scores, np.float64)
    return {f: float(scores[[g == f for g in families]].mean()) for f in tasks.FAMILIES if f in families}


def policy_vs_baseline(prompts: Sequence[str], policy: tuple[Sequence[str], Sequence[bool]],
                       baseline: tuple[Sequence[str], Sequence[bool]], *, policy_rm_scores=None,
                       baseline_rm_scores=None, seed: int = 0) -> dict:
    """{"gold": ..., "rm": ...} comparisons of the policy's and the baseline's (responses, ended) to the same
    prompts: by the gold labeler, and by the RM judge when both sides' RM scores are given."""
    result = {"prompts": len(prompts),
              "gold": stats.compare(gold_scores(prompts, *policy), gold_scores(prompts, *baseline), seed)}
    if (policy_rm_scores is None) != (baseline_rm_scores is None):
        raise ValueError("RM judging needs the scores of both the policy and the baseline")
    if policy_rm_scores is not None:
        result["rm"] = stats.compare(policy_rm_scores, baseline_rm_scores, seed)
    return result
