"""SentencePiece tokenizer: train on the configured corpus (cached by settings + corpus), or load a model.

Special ids are fixed so every stage agrees on them: pad=0, eos=1, bos=2, unk=3 (pad is distinct from
eos, so padding never looks like an end of text). Whitespace is kept exactly (the corpus is Python code
and task text), digits are split one per token (so arithmetic is learnable), and bytes the vocabulary
lacks fall back to byte pieces, so every string round-trips.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

import ml_collections
import sentencepiece as spm
from absl import logging

from instructgpt_jax.errors import ConfigError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
# 256 byte-fallback pieces + 4 specials must fit, with room left for real pieces.
MIN_VOCAB_SIZE = 384
# SentencePiece drops training sentences longer than this many bytes; lines above it are cut.
MAX_TRAIN_LINE_BYTES = 4096


def default_tokenizer_config() -> ml_collections.ConfigDict:
    """`config.tokenizer`: `path` = an existing .model file, or "" to train one on the data mixture."""
    return ml_collections.ConfigDict(
        dict(
            path="",
            vocab_size=2048,
            model_type="bpe",
            max_train_chars=2_000_000,
            character_coverage=0.9999,
        )
    )


def validate_tokenizer_config(tok_cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first impossible `tokenizer.*` value."""
    if tok_cfg.path:
        if not os.path.isfile(tok_cfg.path):
            raise ConfigError(f"tokenizer.path={tok_cfg.path!r}: no such file (use '' to train a tokenizer)")
        return
    if tok_cfg.model_type not in MODEL_TYPES:
        raise ConfigError(f"tokenizer.model_type={tok_cfg.model_type!r}: expected one of {MODEL_TYPES}")
    if tok_cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"tokenizer.vocab_size={tok_cfg.vocab_size}: must be >= {MIN_VOCAB_SIZE} (256 byte pieces)")
    if tok_cfg.max_train_chars <= 0:
        raise ConfigError(f"tokenizer.max_train_chars={tok_cfg.max_train_chars}: must be positive")
    if not 0.9 <= tok_cfg.character_coverage <= 1.0:
        raise ConfigError(f"tokenizer.character_coverage={tok_cfg.character_coverage}: expected in [0.9, 1]")


class Tokenizer:
    """A SentencePiece model with the project's fixed special ids. Picklable (for grain workers)."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self._proto = model_proto
        self.source = source
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        specials = (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id())
        if specials != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
            raise ConfigError(
                f"tokenizer.path={source!r}: special ids (pad, eos, bos, unk) are {specials}, "
                f"expected {(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}"
            )

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        if not os.path.isfile(path):
            raise ConfigError(f"tokenizer.path={path!r}: no such file")
        with open(path, "rb") as f:
            return cls(f.read(), source=path)

    def __getstate__(self):
        return {"proto": self._proto, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["source"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    pad_id, eos_id, bos_id, unk_id = PAD_ID, EOS_ID, BOS_ID, UNK_ID

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first EOS; pad and bos are dropped."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                kept.append(i)
        return self._sp.decode(kept)

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-blank lines of `texts` (newlines become byte pieces) until `max_chars` have been yielded."""
    total = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            line = line.encode("utf-8")[:MAX_TRAIN_LINE_BYTES].decode("utf-8", errors="ignore")
            yield line
            total += len(line)
            if total >= max_chars:
                return


def train_model_proto(
    texts: Iterable[str],
    *,
    vocab_size: int,
    model_type: str = "bpe",
    max_train_chars: int = 2_000_000,
    character_coverage: float = 0.9999,
) -> bytes:
    """Trains a SentencePiece model on at most `max_train_chars` characters of `texts`; returns its bytes."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, max_train_chars),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=False,
            max_sentence_length=MAX_TRAIN_LINE_BYTES,
            num_threads=min(os.cpu_count() or 1, 4),
            minloglevel=2,
        )
    except RuntimeError as e:
        # SentencePiece's message for a corpus too small for the vocabulary ("Vocabulary size too high").
        raise ConfigError(f"tokenizer.vocab_size={vocab_size}: training failed on this corpus: {e}") from e
    return model.getvalue()


def tokenizer_cache_path(tok_cfg: ml_collections.ConfigDict, cache_dir: str, corpus_key: str) -> str:
    """`<cache_dir>/tokenizer_<hash>.model`, the hash covering the training settings and the corpus."""
    settings = dict(
        vocab_size=tok_cfg.vocab_size,
        model_type=tok_cfg.model_type,
        max_train_chars=tok_cfg.max_train_chars,
        character_coverage=tok_cfg.character_coverage,
        line_bytes=MAX_TRAIN_LINE_BYTES,
        specials=[PAD_ID, EOS_ID, BOS_ID, UNK_ID],
        corpus=corpus_key,
        sentencepiece=spm.__version__,
    )
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"tokenizer_{digest}.model")


def _write_atomically(path: str, data: bytes) -> None:
    """Concurrent processes may train the same tokenizer; each renames a complete file into place."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_or_train(
    tok_cfg: ml_collections.ConfigDict,
    cache_dir: str,
    texts_fn: Callable[[], Iterable[str]],
    corpus_key: str = "",
) -> Tokenizer:
    """Loads `tokenizer.path`, or the cached model trained with these settings on this corpus, or trains it.

    `texts_fn` is only called when training; `corpus_key` identifies its corpus in the cache name.
    """
    validate_tokenizer_config(tok_cfg)
    if tok_cfg.path:
        return Tokenizer.from_file(tok_cfg.path)
    path = tokenizer_cache_path(tok_cfg, cache_dir, corpus_key)
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    start = time.perf_counter()
    proto = train_model_proto(
        texts_fn(),
        vocab_size=tok_cfg.vocab_size,
        model_type=tok_cfg.model_type,
        max_train_chars=tok_cfg.max_train_chars,
        character_coverage=tok_cfg.character_coverage,
    )
    _write_atomically(path, proto)
    logging.info("Trained a %d-piece %s tokenizer in %.1fs: %s", tok_cfg.vocab_size, tok_cfg.model_type,
                 time.perf_counter() - start, path)
    return Tokenizer(proto, source=path)

