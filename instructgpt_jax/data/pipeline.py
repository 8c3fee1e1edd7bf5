"""grain loaders: per-process batches with checkpointable state, and global sharded jax.Arrays.

Each process reads only its shard of every source (documents `process_index::process_count`) and
yields its part of the global batch; `to_global_batch` assembles the parts into one jax.Array.
Iterator state (`get_state()` / `set_state()`) is JSON-serialisable, and restoring it continues
exactly where the saved iterator stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags, logging

from instructgpt_jax.data import mixture, sources, tokenizer as tokenizer_lib
from instructgpt_jax.errors import ConfigError, DataError

SPLITS = ("train", "validation")
STDLIB_EXCLUDE = "site-packages,dist-packages,test,tests,idle_test,__pycache__"


def text_source_config(kind: str, weight: float, **overrides: Any) -> ml_collections.ConfigDict:
    """One entry of `data.sources`, with the keys its kind reads (overrides must be among them)."""
    per_kind = {
        "text": dict(path="", glob="**/*", exclude=""),
        "stdlib": dict(path="", glob="**/*.py", exclude=STDLIB_EXCLUDE),
        "tasks": dict(seed=0, num_documents=20_000, num_validation_documents=500),
        "tfds": dict(path="", text_feature="text", train_split="train", validation_split="validation"),
    }
    if kind not in per_kind:
        raise ConfigError(f"data.sources.*.kind={kind!r}: expected one of {sources.TEXT_KINDS}")
    fields = dict(kind=kind, weight=weight, **per_kind[kind])
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ConfigError(f"data.sources ({kind}): unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def validate_source_config(name: str, src: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first impossible `data.sources.<name>.*` value."""
    key = f"data.sources.{name}"
    if src.get("kind") not in sources.TEXT_KINDS:
        raise ConfigError(f"{key}.kind={src.get('kind')!r}: expected one of {sources.TEXT_KINDS}")
    if not src.weight >= 0:
        raise ConfigError(f"{key}.weight={src.weight}: must be non-negative")
    if src.kind in ("text", "tfds") and not src.path:
        raise ConfigError(f"{key}.path: required for kind {src.kind!r}")
    if src.kind == "tasks" and min(src.num_documents, src.num_validation_documents) <= 0:
        raise ConfigError(f"{key}.num_documents and .num_validation_documents: must be positive")


def default_data_config() -> ml_collections.ConfigDict:
    """`config.data`. Source weights are GPT-3 style sampling weights, independent of source sizes."""
    return ml_collections.ConfigDict(
        dict(
            dir="~/.cache/instructgpt_jax/data",  # tfds builds and the trained tokenizer live here
            sources=dict(
                stdlib=text_source_config("stdlib", 0.6),
                tasks=text_source_config("tasks", 0.4),
            ),
            shuffle_seed=0,
            on_bad_record="error",  # or "skip": skip malformed records and count them
            num_workers=0,  # grain worker processes; 0 = in-process
            validation_fraction=0.05,  # of files (text sources) or prompts (JSONL), chosen by hash
            shuffle_window=512,  # packed sequences shuffled within a window of this many; 0 = off
            read_group=16,  # documents read and tokenized together
            demonstrations=dict(path="", overlong="truncate"),  # overlong: truncate | drop | error
            comparisons=dict(path=""),
            prompts=dict(path=""),
        )
    )


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first impossible `data.*` value."""
    if data_cfg.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_record={data_cfg.on_bad_record!r}: expected 'error' or 'skip'")
    if data_cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers={data_cfg.num_workers}: must be >= 0")
    if data_cfg.shuffle_window < 0:
        raise ConfigError(f"data.shuffle_window={data_cfg.shuffle_window}: must be >= 0")
    if data_cfg.read_group < 1:
        raise ConfigError(f"data.read_group={data_cfg.read_group}: must be >= 1")
    if not 0.0 <= data_cfg.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={data_cfg.validation_fraction}: expected in [0, 1)")
    if data_cfg.demonstrations.overlong not in ("truncate", "drop", "error"):
        raise ConfigError(f"data.demonstrations.overlong={data_cfg.demonstrations.overlong!r}: "
                          "expected 'truncate', 'drop' or 'error'")
    if not data_cfg.sources:
        raise ConfigError("data.sources: no sources configured")
    for name, src in data_cfg.sources.items():
        validate_source_config(name, src)
    mixture.mixture_weights(data_cfg)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: expected one of {SPLITS}")


def _check_batch(batch_size: int, process_index: int, process_count: int) -> int:
    """The per-process batch size."""
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ConfigError(f"batch size {batch_size} must be positive and divisible by the "
                          f"process count {process_count}")
    return batch_size // process_count


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _shard(ds: grain.MapDataset, name: str, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's documents. A source smaller than the process count is read whole by every process."""
    if len(ds) < process_count:
        logging.warning("Source %r has %d documents for %d processes: every process reads all of them",
                        name, len(ds), process_count)
        return ds
    return ds[process_index::process_count]


def _epochs(ds: grain.MapDataset, split: str, seed: int) -> grain.MapDataset:
    """Training data: reshuffled each epoch, endless. Validation: in stored order, repeated, so it is
    the same stream on every call and evaluation can take any number of batches."""
    if split == "train":
        ds = ds.shuffle(seed)
    return ds.repeat(None)


def _read_options() -> grain.ReadOptions:
    # Tokenizing is CPU-bound under the GIL: a few threads and a short buffer start fast.
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _read_texts(source: Sequence[dict], feature: str, indices: Sequence[int]) -> list[str]:
    """Batched random access (one call per group is several times faster than one per document)."""
    return [example[feature].decode("utf-8") for example in source.__getitems__([int(i) for i in indices])]


def source_sequences(built: sources.BuiltSource, split: str, tokenizer: tokenizer_lib.Tokenizer, length: int,
                     seed: int, data_cfg: ml_collections.ConfigDict, process_index: int = 0,
                     process_count: int = 1) -> grain.IterDataset:
    """One source's documents for this process -> tokens + EOS each -> packed rows of `length` tokens.

    Documents are read and tokenized `data.read_group` at a time; packing concatenates them anyway.
    """
    source = built.split(split)
    indices = _epochs(_shard(grain.MapDataset.range(len(source)), built.name, process_index, process_count),
                      split, seed)
    encode = mixture.document_tokens(tokenizer.encode, tokenizer.eos_id)
    feature = built.text_feature

    def group_tokens(group: np.ndarray) -> np.ndarray:
        return np.concatenate([encode(text) for text in _read_texts(source, feature, group)])

    tokens = indices.batch(data_cfg.read_group).map(group_tokens).to_iter_dataset(_read_options())
    packed = mixture.pack_sequences(tokens, length)
    if split == "train" and data_cfg.shuffle_window > 1:
        packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=data_cfg.shuffle_window, seed=seed)
    return packed


def build_mixture_sources(data_cfg: ml_collections.ConfigDict) -> dict[str, sources.BuiltSource]:
    """Builds (or reuses) every source with a positive weight, in `mixture_weights` (name) order."""
    validate_data_config(data_cfg)
    return {name: sources.build_text_source(name, data_cfg) for name in mixture.mixture_weights(data_cfg)}


def lm_batches(data_cfg: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
               batch_size: int, split: str, seed: int, process_index: int = 0,
               process_count: int = 1) -> grain.DatasetIterator:
    """Pretraining batches `{"tokens": int32[B_local, seq_len + 1], "source": int32[B_local]}`.

    inputs = tokens[:, :-1], targets = tokens[:, 1:]; `source` indexes `mixture.mixture_weights(data_cfg)`
    (see `mixture.realised_mixture`). Endless; `split="validation"` gives the same stream every call.
    """
    _check_split(split)
    local_batch = _check_batch(batch_size, process_index, process_count)
    built = build_mixture_sources(data_cfg)
    weights = mixture.mixture_weights(data_cfg)
    if split == "validation":
        missing = [name for name in built if split not in built[name].splits]
        for name in missing:
            logging.warning("Source %r has no validation split; it is left out of the validation mixture", name)
        weights = {name: w for name, w in weights.items() if name not in missing}
        if not weights:
            raise DataError(f"no source has a validation split: {[b.directory for b in built.values()]}")
    streams = {}
    for index, name in enumerate(built):
        if name in weights:
            packed = source_sequences(built[name], split, tokenizer, seq_len + 1,
                                      _seed(data_cfg.shuffle_seed, seed, index, process_index),
                                      data_cfg, process_index, process_count)
            streams[name] = mixture.tag_with_source(packed, index)
    batches = mixture.mix(streams, weights).batch(local_batch, drop_remainder=True)
    return _start(batches, data_cfg.num_workers)


def _start(ds: grain.IterDataset, num_workers: int) -> grain.DatasetIterator:
    if num_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(with_json_state(ds))


def _restore_tuples(state):
    """JSON turns tuples into lists; grain's packing state compares slices with tuples, so turn them back."""
    if isinstance(state, dict):
        return {k: (_slices_to_tuples(v) if k == "remainder_slices" else _restore_tuples(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [_restore_tuples(v) for v in state]
    return state


def _slices_to_tuples(slices: Mapping) -> dict:
    return {k: tuple(v) for k, v in slices.items()}


def with_json_state(ds: grain.IterDataset) -> grain.IterDataset:
    """`ds` whose iterators accept a state that went through json.dumps / json.loads."""
    return _JsonStateIterDataset(ds)


class _JsonStateIterDataset(grain.IterDataset):
    """Passes elements through; its iterator accepts a state that went through json.dumps / json.loads."""

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonStateIterator(self._parent.__iter__())


class _JsonStateIterator(grain.DatasetIterator):

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(_restore_tuples(state))


# ---------------------------------------------------------------------------------------------------
# Tokenizer corpus


def tokenizer_texts(data_cfg: ml_collections.ConfigDict, max_chars: int, seed: int = 0) -> Iterator[str]:
    """Training documents of the mixture, in random order, about weight * max_chars characters per source."""
    built = build_mixture_sources(data_cfg)
    for index, (name, weight) in enumerate(mixture.mixture_weights(data_cfg).items()):
        source = built[name].split("train")
        order = np.random.default_rng(_seed(seed, index)).permutation(len(source))
        budget = int(weight * max_chars)
        for start in range(0, len(order), 256):
            for text in _read_texts(source, built[name].text_feature, order[start:start + 256]):
                yield text[:budget]
                budget -= len(text)
                if budget <= 0:
                    break
            if budget <= 0:
                break


def corpus_key(data_cfg: ml_collections.ConfigDict) -> str:
    """Identifies the tokenizer's corpus: each built source's directory (named by its inputs' hash) and weight."""
    built = build_mixture_sources(data_cfg)
    weights = mixture.mixture_weights(data_cfg)
    spec = sorted((name, built[name].directory, round(weights[name], 6)) for name in built)
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def load_tokenizer(tok_cfg: ml_collections.ConfigDict,
                   data_cfg: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
    """`tokenizer.path`, or a tokenizer trained on (and cached beside) the configured data mixture."""
    if tok_cfg.path:
        try:
            return tokenizer_lib.load_or_train(tok_cfg, "", lambda: iter(()))
        except RuntimeError as e:  # sentencepiece cannot parse the file
            raise ConfigError(f"tokenizer.path={tok_cfg.path!r}: not a readable tokenizer model "
                              f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from e
    return tokenizer_lib.load_or_train(
        tok_cfg, sources.data_dir(data_cfg), lambda: tokenizer_texts(data_cfg, tok_cfg.max_train_chars),
        corpus_key=corpus_key(data_cfg))


# ---------------------------------------------------------------------------------------------------
# Supervised fine-tuning


def sft_example(prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_id: int, pad_id: int,
                seq_len: int) -> dict[str, np.ndarray]:
    """prompt + completion + EOS, right-padded to seq_len + 1; loss on completion tokens and the EOS.

    Longer sequences are cut to seq_len + 1 tokens (callers decide whether to allow that).
    """
    ids = (list(prompt_ids) + list(completion_ids) + [eos_id])[: seq_len + 1]
    tokens = np.full(seq_len + 1, pad_id, dtype=np.int32)
    tokens[: len(ids)] = ids
    target_positions = np.arange(1, seq_len + 1)  # loss_mask[t] weighs the prediction of tokens[t + 1]
    loss_mask = (target_positions >= len(prompt_ids)) & (target_positions < len(ids))
    return {"tokens": tokens, "loss_mask": loss_mask.astype(np.float32)}


def _tokenized_demonstrations(data_cfg, built: sources.BuiltSource, split: str, tokenizer, seq_len: int,
                              process_index: int, process_count: int) -> list[dict[str, np.ndarray]]:
    """This process's demonstrations as SFT examples, applying `data.demonstrations.overlong`."""
    mode, path = data_cfg.demonstrations.overlong, data_cfg.demonstrations.path
    source = _shard(grain.MapDataset.source(built.split(split)), built.name, process_index, process_count)
    examples, truncated, dropped = [], 0, 0
    for record in source:
        prompt = tokenizer.encode(record["prompt"].decode("utf-8"))
        completion = tokenizer.encode(record["completion"].decode("utf-8"))
        length = len(prompt) + len(completion) + 1
        if length > seq_len + 1:
            if mode == "error":
                raise DataError(f"{path}:{int(record['line'])}: demonstration is {length} tokens, longer than "
                                f"seq_len + 1 = {seq_len + 1} (data.demonstrations.overlong='error')")
            if mode == "drop" or len(prompt) >= seq_len:  # nothing of the completion would fit
                dropped += 1
                continue
            truncated += 1
        examples.append(sft_example(prompt, completion, tokenizer.eos_id, tokenizer.pad_id, seq_len))
    if truncated or dropped:
        logging.warning("%s (%s): %d of %d demonstrations exceed %d tokens: %d truncated, %d dropped",
                        path, split, truncated + dropped, len(source), seq_len + 1, truncated, dropped)
    if not examples:
        raise DataError(f"{path}: no {split} demonstrations fit in seq_len + 1 = {seq_len + 1} tokens")
    return examples


def sft_batches(data_cfg: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
                batch_size: int, split: str, seed: int, process_index: int = 0,
                process_count: int = 1) -> grain.DatasetIterator:
    """SFT batches `{"tokens": int32[B_local, seq_len + 1], "loss_mask": float32[B_local, seq_len]}`.

    Demonstrations from `data.demonstrations.path`; endless (validation: same order every call).
    """
    _check_split(split)
    local_batch = _check_batch(batch_size, process_index, process_count)
    validate_data_config(data_cfg)
    built = sources.build_jsonl_source("demonstrations", data_cfg)
    examples = _tokenized_demonstrations(data_cfg, built, split, tokenizer, seq_len, process_index, process_count)
    ds = _epochs(grain.MapDataset.source(examples), split, _seed(data_cfg.shuffle_seed, seed, process_index))
    return _start(ds.batch(local_batch, drop_remainder=True).to_iter_dataset(_read_options()), data_cfg.num_workers)


# ---------------------------------------------------------------------------------------------------
# Reward model: K ranked responses per prompt


def comparison_records(built: sources.BuiltSource, split: str, process_index: int = 0,
                       process_count: int = 1) -> list[dict]:
    """This process's comparisons as Python values: prompt, responses (best first), ended flags, line.

    `ended` (one bool per response) may be given in the record; a response that did not end gets no EOS.
    """
    source = _shard(grain.MapDataset.source(built.split(split)), built.name, process_index, process_count)
    records = []
    for example in source:
        record = sources.to_python(example)
        responses = record["responses"]
        ended = json.loads(record["meta"] or "{}").get("ended", [True] * len(responses))
        if not isinstance(ended, list) or len(ended) != len(responses):
            raise DataError(f"{built.directory} (line {record['line']}): field 'ended' must be a list of "
                            f"{len(responses)} booleans, one per response")
        records.append({"prompt": record["prompt"], "responses": responses, "ended": [bool(e) for e in ended],
                        "line": record["line"]})
    return records


def response_tokens(prompt_ids: Sequence[int], response_ids: Sequence[int], ended: bool, eos_id: int) -> list[int]:
    """prompt + response, + EOS if the response ended: the sequence the RM reads at its last token."""
    return list(prompt_ids) + list(response_ids) + ([eos_id] if ended else [])


def comparison_example(sequences: Sequence[Sequence[int]], prompt_len: int, pad_id: int, seq_len: int,
                       max_responses: int) -> dict[str, np.ndarray]:
    """K token sequences (best first), each prompt_len prompt tokens + a response -> {"tokens":
    int32[K_max, seq_len] right-padded, "last_index": int32[K_max] (position of each last token),
    "response_start": int32[K_max] (prompt_len), "num_responses": int32 K}."""
    if not 2 <= len(sequences) <= max_responses:
        raise ValueError(f"need 2 <= K <= max_responses={max_responses} responses, got {len(sequences)}")
    tokens = np.full((max_responses, seq_len), pad_id, dtype=np.int32)
    last_index = np.zeros(max_responses, dtype=np.int32)
    for k, ids in enumerate(sequences):
        if not 0 < len(ids) <= seq_len:
            raise ValueError(f"response {k} is {len(ids)} tokens; must be 1..seq_len={seq_len}")
        tokens[k, : len(ids)] = ids
        last_index[k] = len(ids) - 1
    return {"tokens": tokens, "last_index": last_index,
            "response_start": np.full(max_responses, prompt_len, dtype=np.int32),
            "num_responses": np.int32(len(sequences))}


def tokenize_comparison(record: dict, tokenizer: tokenizer_lib.Tokenizer, seq_len: int, max_responses: int,
                        where: str) -> tuple[dict[str, np.ndarray] | None, list[int]]:
    """(example, indices of the kept responses): responses longer than seq_len are dropped, keeping the
    order of the rest; None when fewer than 2 remain. More than max_responses raises ConfigError."""
    if len(record["responses"]) > max_responses:
        raise ConfigError(f"{where}: {len(record['responses'])} responses, more than rm.max_responses="
                          f"{max_responses}; raise rm.max_responses")
    prompt = tokenizer.encode(record["prompt"])
    sequences = [response_tokens(prompt, tokenizer.encode(r), e, tokenizer.eos_id)
                 for r, e in zip(record["responses"], record["ended"])]
    kept = [k for k, ids in enumerate(sequences) if len(ids) <= seq_len]
    if len(kept) < 2:
        return None, kept
    return comparison_example([sequences[k] for k in kept], len(prompt), tokenizer.pad_id, seq_len,
                              max_responses), kept


def tokenized_comparisons(data_cfg: ml_collections.ConfigDict, built: sources.BuiltSource, split: str,
                          tokenizer: tokenizer_lib.Tokenizer, seq_len: int, max_responses: int,
                          process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """This process's comparisons as RM examples (see tokenize_comparison)."""
    path = data_cfg.comparisons.path
    examples, dropped_responses, dropped_prompts = [], 0, 0
    for record in comparison_records(built, split, process_index, process_count):
        example, kept = tokenize_comparison(record, tokenizer, seq_len, max_responses, f"{path}:{record['line']}")
        dropped_responses += len(record["responses"]) - len(kept)
        if example is None:
            dropped_prompts += 1
            continue
        examples.append(example)
    if dropped_responses:
        logging.warning("%s (%s): dropped %d responses longer than %d tokens (%d prompts left with < 2)",
                        path, split, dropped_responses, seq_len, dropped_prompts)
    if not examples:
        raise DataError(f"{path}: no {split} comparisons with >= 2 responses fit in seq_len={seq_len} tokens")
    return examples


def rm_batches(data_cfg: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
               batch_size: int, max_responses: int, split: str, seed: int, process_index: int = 0,
               process_count: int = 1) -> grain.DatasetIterator:
    """RM batches of prompts, each with its K <= max_responses responses best first:
    `{"tokens": int32[B_local, K_max, seq_len], "last_index", "response_start": int32[B_local, K_max],
    "num_responses": int32[B_local]}` (comparison_example's fields).

    Comparisons from `data.comparisons.path`; endless (validation: same order every call).
    """
    _check_split(split)
    local_batch = _check_batch(batch_size, process_index, process_count)
    validate_data_config(data_cfg)
    built = sources.build_jsonl_source("comparisons", data_cfg)
    examples = tokenized_comparisons(data_cfg, built, split, tokenizer, seq_len, max_responses,
                                     process_index, process_count)
    ds = _epochs(grain.MapDataset.source(examples), split, _seed(data_cfg.shuffle_seed, seed, process_index))
    return _start(ds.batch(local_batch, drop_remainder=True).to_iter_dataset(_read_options()), data_cfg.num_workers)


# ---------------------------------------------------------------------------------------------------
# Global arrays


def _sharding_for_rank(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """A NamedSharding whose spec names more dimensions than an array has, cut to the array's rank."""
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) > ndim:
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:ndim]))
    return sharding


def to_global_batch(local_batch: Mapping[str, np.ndarray],
                    sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
    """Each process's rows -> one global jax.Array per key, batch dimension split as `sharding` says."""
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        key_sharding = sharding[key] if isinstance(sharding, Mapping) else sharding
        out[key] = jax.make_array_from_process_local_data(_sharding_for_rank(key_sharding, value.ndim), value)
    return out
