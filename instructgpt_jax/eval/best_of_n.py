"""Best-of-n under a reward model, scored by gold: how much a reward model can improve a policy, before PPO.

For each prompt, n responses are sampled from the policy; best-of-k keeps the one of the first k that the
reward model scores highest and reports its gold score. Its KL to the policy is at most
log k − (k − 1)/k nats (Stiennon et al. 2020 App. G.3), so the curve of gold against k is the
over-optimisation curve of Gao et al. (2022) without any RL: gold rises while the reward model ranks the
policy's samples well and falls once selection finds what it overrates. Picking by gold instead gives the
ceiling of the same samples. A PPO policy should not be expected to beat the reward model's best-of-k at
the same KL.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def kl_bound(k: int) -> float:
    """Upper bound on KL(best-of-k || policy) in nats: log k − (k − 1)/k."""
    return math.log(k) - (k - 1) / k


def best_of(selector: np.ndarray, gold: np.ndarray, k: int) -> np.ndarray:
    """Gold score [P] of the response that `selector` [P, n] ranks highest among the first k of each prompt
    (ties go to the earlier response)."""
    if not 1 <= k <= selector.shape[1]:
        raise ValueError(f"best-of-{k} needs 1 <= k <= {selector.shape[1]} samples per prompt")
    chosen = np.argmax(selector[:, :k], axis=1)
    return gold[np.arange(len(gold)), chosen]


def best_of_n_curve(scores, gold, ks: Sequence[int]) -> list[dict]:
    """Rows {k, kl_bound, gold (best by the reward model), oracle (best by gold)} for each k, from reward
    model scores and gold scores [P, n] of n samples per prompt."""
    scores, gold = np.asarray(scores, np.float64), np.asarray(gold, np.float64)
    if scores.shape != gold.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and gold {gold.shape} must both be [prompts, samples]")
    return [{"k": int(k), "kl_bound": kl_bound(k), "gold": float(best_of(scores, gold, k).mean()),
             "oracle": float(best_of(gold, gold, k).mean())} for k in ks]


def format_curve(rows: list[dict]) -> str:
    """One line: 'best-of-k gold (KL <= ...): ...'."""
    return ", ".join(f"k={r['k']}: {r['gold']:.3f} (KL<={r['kl_bound']:.2f}, gold-picked {r['oracle']:.3f})"
                     for r in rows)
