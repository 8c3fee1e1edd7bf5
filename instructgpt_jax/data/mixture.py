"""GPT-3 style data mixing and packing (Brown et al. 2020, §2.2 and Table 2.2).

GPT-3 samples each training sequence from a source with a fixed probability that does not depend on
the source's size: Common Crawl gets 60% of the mix though it is hundreds of times larger than the
books or Wikipedia, which are therefore seen for several epochs while Common Crawl is seen for less
than one. Here each source is tokenized, packed into sequences of T+1 tokens on its own
(concatenate-then-split with an EOS after every document, so no padding is wasted), and the packed
streams are interleaved by weight with grain's `IterDataset.mix`. The weights are thus exact
fractions of training tokens, whatever the document lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import grain
import ml_collections
import numpy as np

from instructgpt_jax.errors import ConfigError

SOURCE_KEY = "source"  # per-sequence index of the source it came from, for measuring the realised mix


def mixture_weights(data_cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Normalised weights of the sources that take part (weight > 0), by name (ConfigDict order)."""
    weights = {name: float(src.weight) for name, src in data_cfg.sources.items()}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ConfigError(f"data.sources.*.weight={weights}: must be non-negative and not all zero")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items() if w > 0}


def document_tokens(encode: Callable[[str], list[int]], eos_id: int) -> Callable[[str], np.ndarray]:
    """text -> int32 token ids followed by one EOS: the separator between packed documents."""

    def tokens(text: str) -> np.ndarray:
        return np.asarray(encode(text) + [eos_id], dtype=np.int32)

    return tokens


def pack_sequences(token_arrays: grain.IterDataset, length: int) -> grain.IterDataset:
    """Concatenate the token arrays of consecutive documents and split into rows of exactly `length`."""
    packed = grain.experimental.ConcatThenSplitIterDataset(
        token_arrays.map(lambda t: {"tokens": t}), length_struct={"tokens": length}
    )
    return packed.map(lambda row: row["tokens"])


def tag_with_source(sequences: grain.IterDataset, source_index: int) -> grain.IterDataset:
    return sequences.map(lambda tokens: {"tokens": tokens, SOURCE_KEY: np.int32(source_index)})


def mix(streams: Mapping[str, grain.IterDataset], weights: Mapping[str, float]) -> grain.IterDataset:
    """Interleave infinite streams in the given proportions (deterministic, so exactly proportional).

    Keyed by source name, so a checkpoint taken before adding or reweighting a source still restores
    the others where they stopped.
    """
    if set(streams) != set(weights):
        raise ValueError(f"streams {sorted(streams)} and weights {sorted(weights)} name different sources")
    if len(streams) == 1:
        return next(iter(streams.values()))
    return grain.IterDataset.mix(dict(streams), {name: weights[name] for name in streams})


def realised_mixture(source_ids: Iterable[np.ndarray], names: Iterable[str]) -> dict[str, float]:
    """Fraction of sequences that came from each source, given the `source` arrays of the batches seen."""
    names = list(names)
    counts = np.bincount(np.concatenate([np.ravel(ids) for ids in source_ids]), minlength=len(names))
    total = max(int(counts.sum()), 1)
    return {name: float(counts[i]) / total for i, name in enumerate(names)}
