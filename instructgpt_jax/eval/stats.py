"""Summary statistics with confidence intervals: means, paired differences and win rates.

Everything here is a pure function of numpy arrays and an explicit seed. Bootstrap intervals resample
prompts (the unit that was sampled), percentile method (Efron & Tibshirani 1993, §13.3).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95


def mean_ci(values) -> dict:
    """Mean and 95% normal-approximation half-width."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "ci95": float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))}


def bootstrap_ci(values, statistic: Callable[[np.ndarray], np.ndarray] = lambda x: x.mean(axis=-1),
                 seed: int = 0, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over the rows of `values` [N, ...].

    `statistic` maps resampled values [n_resamples, N, ...] to [n_resamples] (default: the mean)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("bootstrap_ci of no values")
    rows = np.random.default_rng(seed).integers(0, len(values), size=(n_resamples, len(values)))
    resampled = np.asarray(statistic(values[rows]))
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(resampled, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_difference(a, b, seed: int = 0) -> dict:
    """mean(a − b) over paired samples (same prompts), its normal 95% half-width and bootstrap interval."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if diff.ndim != 1:
        raise ValueError(f"paired_difference needs two equal-length 1-D arrays, got shapes {np.shape(a)}, {np.shape(b)}")
    low, high = bootstrap_ci(diff, seed=seed)
    return {**mean_ci(diff), "ci_low": low, "ci_high": high}


def win_outcomes(policy, baseline, tie_tolerance: float = 0.0) -> np.ndarray:
    """Per-prompt outcome of policy vs baseline: 1 win, 0.5 tie (|difference| <= tie_tolerance), 0 loss."""
    diff = np.asarray(policy, np.float64) - np.asarray(baseline, np.float64)
    if diff.ndim != 1:
        raise ValueError(f"win_outcomes needs two equal-length 1-D arrays, got shapes {np.shape(policy)}, "
                         f"{np.shape(baseline)}")
    return np.where(np.abs(diff) <= tie_tolerance, 0.5, (diff > 0).astype(np.float64))


def win_rate(policy, baseline, seed: int = 0, tie_tolerance: float = 0.0) -> dict:
    """How often the policy's response beats the baseline's to the same prompt, ties counting one half
    (InstructGPT Fig. 1's "win rate against the baseline"), with a bootstrap 95% interval over prompts."""
    outcomes = win_outcomes(policy, baseline, tie_tolerance)
    low, high = bootstrap_ci(outcomes, seed=seed)
    return {"win_rate": float(outcomes.mean()), "ci_low": low, "ci_high": high, "n": int(len(outcomes)),
            "wins": int((outcomes == 1).sum()), "ties": int((outcomes == 0.5).sum()),
            "losses": int((outcomes == 0).sum())}


def compare(policy_scores, baseline_scores, seed: int = 0, tie_tolerance: float = 0.0) -> dict:
    """Policy vs baseline under one scorer (gold labeler, RM judge, ...): each side's mean ± CI, the paired
    difference and the win rate, over the same prompts in the same order."""
    policy, baseline = np.asarray(policy_scores, np.float64), np.asarray(baseline_scores, np.float64)
    if policy.shape != baseline.shape or policy.ndim != 1 or len(policy) < 2:
        raise ValueError(f"compare needs two equal-length 1-D score arrays of >= 2 prompts, got shapes "
                         f"{policy.shape} and {baseline.shape}")
    return {"policy": mean_ci(policy), "baseline": mean_ci(baseline),
            "difference": paired_difference(policy, baseline, seed),
            **win_rate(policy, baseline, seed, tie_tolerance)}
