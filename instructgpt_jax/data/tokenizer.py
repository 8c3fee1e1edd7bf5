"""Tokenizers: SentencePiece (trained on the configured corpus, cached by settings + corpus, or loaded),
or GPT-2's byte-level BPE read from files the user supplies (`tokenizer.kind="gpt2_bpe"`).

SentencePiece special ids are fixed so every stage agrees on them: pad=0, eos=1, bos=2, unk=3 (pad is
distinct from eos, so padding never looks like an end of text). Whitespace is kept exactly (the corpus
is Python code and task text), digits are split one per token (so arithmetic is learnable), and bytes
the vocabulary lacks fall back to byte pieces, so every string round-trips.

GPT-2's BPE (Radford et al. 2019 §2.2) has one special token, <|endoftext|> (50256), which serves as
eos, bos and pad (GPT-2 has no pad token; padding is always masked or follows an eos). Every string
round-trips through its 256 byte tokens, so there is no unknown token.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator

import ml_collections
import sentencepiece as spm
from absl import logging

from instructgpt_jax.errors import ConfigError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
KINDS = ("sentencepiece", "gpt2_bpe")
# 256 byte-fallback pieces + 4 specials must fit, with room left for real pieces.
MIN_VOCAB_SIZE = 384
# SentencePiece drops training sentences longer than this many bytes; lines above it are cut.
MAX_TRAIN_LINE_BYTES = 4096


def default_tokenizer_config() -> ml_collections.ConfigDict:
    """`config.tokenizer`: kind "sentencepiece": `path` = an existing .model file, or "" to train one on the
    data mixture; kind "gpt2_bpe": `path` = a directory with vocab.json + merges.txt, or a tokenizer.json."""
    return ml_collections.ConfigDict(
        dict(
            kind="sentencepiece",
            path="",
            vocab_size=2048,
            model_type="bpe",
            max_train_chars=2_000_000,
            character_coverage=0.9999,
        )
    )


def validate_tokenizer_config(tok_cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first impossible `tokenizer.*` value."""
    kind = tok_cfg.get("kind", "sentencepiece")
    if kind not in KINDS:
        raise ConfigError(f"tokenizer.kind={kind!r}: expected one of {KINDS}")
    if kind == "gpt2_bpe":
        gpt2_bpe_files(tok_cfg.path)
        return
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
    if tok_cfg.get("kind", "sentencepiece") == "gpt2_bpe":
        return ByteLevelBPETokenizer.from_path(tok_cfg.path)
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



# ------------------------------------------------------------------------ GPT-2 byte-level BPE

GPT2_EOS_TOKEN = "<|endoftext|>"
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+"""


# Letters and numbers (categories L*, N*) all lie in Unicode planes 0-3; planes 4-16 hold none.
_LAST_LETTER_PLANE_END = 0x3FFFF


def _category_classes(prefixes: tuple[str, ...]) -> list[str]:
    """`re` character-class bodies, one per category prefix, of the code points in that category
    (the stdlib `re` has no \\p{L} / \\p{N}, which GPT-2's pre-tokenizer pattern uses)."""
    ranges = {p: [] for p in prefixes}
    current, start = None, 0
    for cp in range(_LAST_LETTER_PLANE_END + 2):
        category = unicodedata.category(chr(cp))[0] if cp <= _LAST_LETTER_PLANE_END else None
        kind = category if category in ranges else None
        if kind != current:
            if current is not None:
                ranges[current].append(re.escape(chr(start)) + ("-" + re.escape(chr(cp - 1)) if cp - 1 > start else ""))
            current, start = kind, cp
    return ["".join(ranges[p]) for p in prefixes]


@functools.cache
def gpt2_pretokenizer() -> re.Pattern:
    """GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other runs, each with one leading
    space, and whitespace (a space before a word goes with the word)."""
    letters, numbers = _category_classes(("L", "N"))
    return re.compile(_GPT2_SPLIT.format(L=letters, N=numbers))


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes that print as themselves keep their
    character; the others are shifted past 255, so no token contains whitespace or control characters)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


def gpt2_bpe_files(path: str) -> tuple[str, ...]:
    """(tokenizer.json,) or (vocab.json, merges.txt) for a `tokenizer.path` that is such a file or a
    directory holding them (tokenizer.json preferred); ConfigError naming what is missing."""
    if not path:
        raise ConfigError('tokenizer.path="": tokenizer.kind="gpt2_bpe" needs the directory of GPT-2\'s '
                          "vocab.json + merges.txt (or a tokenizer.json)")
    if os.path.isfile(path):
        if os.path.basename(path) != "tokenizer.json":
            raise ConfigError(f"tokenizer.path={path!r}: expected a directory or a tokenizer.json for gpt2_bpe")
        return (path,)
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer.path={path!r}: no such file or directory")
    joined = os.path.join(path, "tokenizer.json")
    if os.path.isfile(joined):
        return (joined,)
    files = (os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    for f in files:
        if not os.path.isfile(f):
            raise ConfigError(f"tokenizer.path={path!r}: no {os.path.basename(f)} (nor tokenizer.json) there")
    return files


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"tokenizer.path: cannot read {path}: {e}") from e


def _merge_pair(line, source: str) -> tuple[str, str]:
    pair = tuple(line.split(" ")) if isinstance(line, str) else tuple(line)
    if len(pair) != 2:
        raise ConfigError(f"tokenizer.path: malformed merge {line!r} in {source}")
    return pair


def _read_gpt2_bpe(files: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id including special tokens, merges in priority order) from the files."""
    if len(files) == 2:
        vocab = _read_json(files[0])
        with open(files[1], encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        merges = [_merge_pair(line, files[1]) for line in lines if line and not line.startswith("#version")]
        return vocab, merges
    spec = _read_json(files[0])
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or '"ByteLevel"' not in json.dumps(spec.get("pre_tokenizer")):
        raise ConfigError(f"tokenizer.path: {files[0]} is not a byte-level BPE (GPT-2 style) tokenizer")
    vocab = dict(model["vocab"])
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    return vocab, [_merge_pair(m, files[0]) for m in model.get("merges", [])]


class ByteLevelBPETokenizer:
    """GPT-2's byte-level BPE in pure Python, with the interface of `Tokenizer`.

    Text that spells <|endoftext|> is encoded as ordinary text (the stages append eos themselves),
    as the SentencePiece tokenizer does."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "<memory>"):
        if GPT2_EOS_TOKEN not in vocab:
            raise ConfigError(f"tokenizer.path={source!r}: the vocabulary has no {GPT2_EOS_TOKEN} token")
        self._vocab, self._merges, self.source = dict(vocab), list(merges), source
        self._ranks = {pair: rank for rank, pair in enumerate(self._merges)}
        self._tokens = {i: t for t, i in self._vocab.items()}
        self._byte_chars = bytes_to_unicode()
        self._char_bytes = {c: b for b, c in self._byte_chars.items()}
        missing = [c for c in self._byte_chars.values() if c not in self._vocab]
        if missing:
            raise ConfigError(f"tokenizer.path={source!r}: {len(missing)} of the 256 byte tokens are missing")
        self.eos_id = self.bos_id = self.pad_id = self._vocab[GPT2_EOS_TOKEN]
        self.unk_id = None
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_path(cls, path: str) -> "ByteLevelBPETokenizer":
        files = gpt2_bpe_files(path)
        vocab, merges = _read_gpt2_bpe(files)
        return cls(vocab, merges, source=path)

    def __getstate__(self):
        return {"vocab": self._vocab, "merges": self._merges, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["vocab"], state["merges"], state["source"])

    @property
    def vocab_size(self) -> int:
        return max(self._tokens) + 1

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token (already mapped to byte characters): merge the best-ranked pair until none applies."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self._ranks.get(pair, len(self._ranks)))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self._vocab[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        ids = []
        for piece in gpt2_pretokenizer().findall(text):
            ids += self._bpe("".join(self._byte_chars[b] for b in piece.encode("utf-8")))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first eos (<|endoftext|>, also the pad id). Ids outside the vocabulary
        (the model's padded rows, never sampled) are dropped; bytes that are not UTF-8 become U+FFFD."""
        data = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            token = self._tokens.get(i)
            if token is None:
                continue
            if all(c in self._char_bytes for c in token):
                data += bytes(self._char_bytes[c] for c in token)
            else:  # an added special token: its text
                data += token.encode("utf-8")
        return data.decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> str:
        return self._tokens[int(token_id)]
