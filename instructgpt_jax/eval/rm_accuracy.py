"""Reward-model pairwise accuracy: how often its scores order two responses as the labelers ranked them."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from instructgpt_jax.data.tokenizer import PAD_ID
from instructgpt_jax.eval import stats


def score_sequences(score_fn, params, sequences, response_starts, seq_len: int, chunk: int = 256) -> np.ndarray:
    """Raw scores of token sequences (each read at its last token; its response begins at the index in
    response_starts), in fixed-size padded chunks. score_fn(params, tokens, last_index, response_start)."""
    if len(sequences) != len(response_starts):
        raise ValueError(f"{len(sequences)} sequences but {len(response_starts)} response starts")
    scores = []
    for start in range(0, len(sequences), chunk):
        part = sequences[start:start + chunk]
        tokens = np.full((chunk, seq_len), PAD_ID, np.int32)
        last, first = np.zeros(chunk, np.int32), np.zeros(chunk, np.int32)
        first[:len(part)] = response_starts[start:start + chunk]
        for i, ids in enumerate(part):
            tokens[i, :len(ids)], last[i] = ids, len(ids) - 1
        scores.append(np.asarray(score_fn(params, tokens, last, first))[:len(part)])
    return np.concatenate(scores) if scores else np.zeros(0)


def score_texts(score_fn, params, tokenizer, prompts, responses, ended, seq_len: int) -> np.ndarray:
    """Raw RM scores of (prompt, response) texts, tokenized as the RM was trained (prompt + response, + EOS
    when the response ended); sequences are cut to their last seq_len tokens."""
    sequences, starts = [], []
    for prompt, response, done in zip(prompts, responses, ended, strict=True):
        prompt_ids = tokenizer.encode(prompt)
        ids = prompt_ids + tokenizer.encode(response) + ([tokenizer.eos_id] if done else [])
        sequences.append(ids[-seq_len:])
        starts.append(max(0, len(prompt_ids) - (len(ids) - len(sequences[-1]))))
    return score_sequences(score_fn, params, sequences, starts, seq_len)


def pair_agreement(scores, reference, responses) -> tuple[int, int]:
    """(agreeing, counted) over pairs i < j of distinct strings whose reference values differ: pairs the
    scores order the same way as `reference` (higher = better)."""
    agree = total = 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if responses[i] == responses[j] or reference[i] == reference[j]:
                continue
            total += 1
            agree += int(np.sign(scores[i] - scores[j]) == np.sign(reference[i] - reference[j]))
    return agree, total


def ranked_accuracy(scores: Sequence[Sequence[float]], responses: Sequence[Sequence[str]], seed: int = 0) -> dict:
    """Pairwise accuracy of per-prompt scores whose responses are listed best first (the comparison
    format), with a bootstrap 95% interval over prompts (pairs of one prompt are not independent)."""
    counts = np.array([pair_agreement(np.asarray(s, np.float64), -np.arange(len(s), dtype=np.float64), r)
                       for s, r in zip(scores, responses, strict=True)], np.float64).reshape(-1, 2)
    pairs = counts[:, 1].sum()
    if not pairs:
        return {"accuracy": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "pairs": 0,
                "prompts": len(counts)}
    ratio = lambda c: c[..., 0].sum(-1) / np.maximum(c[..., 1].sum(-1), 1)  # noqa: E731
    low, high = stats.bootstrap_ci(counts, ratio, seed=seed)
    return {"accuracy": float(counts[:, 0].sum() / pairs), "ci_low": low, "ci_high": high, "pairs": int(pairs),
            "prompts": len(counts)}
