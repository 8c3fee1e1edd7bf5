import json
import pickle
import string
import textwrap
import time

import pytest

from instructgpt_jax.data import pipeline, tokenizer as tokenizer_lib
from instructgpt_jax.errors import ConfigError

CODE = '''def mean(xs: list[float]) -> float:
    """Average of xs.\tTabs, "quotes" and ünïcödé stay."""
    return sum(xs) / len(xs)  # 12 + 34 = 46


'''
TASK = "Add the numbers: 4071 + 398\nAnswer: 4469\n\nSort the words: pear fig apple\nAnswer: apple fig pear"


@pytest.fixture(scope="module")
def stdlib_tokenizer(tmp_path_factory):
    """A tokenizer trained on a capped sample of the standard-library source (the embedded corpus)."""
    data_cfg = pipeline.default_data_config()
    data_cfg.dir = str(tmp_path_factory.mktemp("data"))
    data_cfg.sources = {"stdlib": data_cfg.sources.stdlib}
    tok_cfg = tokenizer_lib.default_tokenizer_config()
    tok_cfg.max_train_chars = 300_000
    start = time.perf_counter()
    tokenizer = pipeline.load_tokenizer(tok_cfg, data_cfg)
    return tokenizer, time.perf_counter() - start, tok_cfg, data_cfg


def test_training_on_the_stdlib_takes_seconds(stdlib_tokenizer):
    tokenizer, seconds, tok_cfg, _ = stdlib_tokenizer
    assert seconds < 60, f"building the stdlib source and training took {seconds:.1f}s"
    assert tokenizer.vocab_size == tok_cfg.vocab_size == 2048
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)


@pytest.mark.parametrize("text", [CODE, TASK, "  leading and trailing  \n\n\n", "日本語 and emoji 🙂"])
def test_encode_decode_round_trip(stdlib_tokenizer, text):
    tokenizer = stdlib_tokenizer[0]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert not {tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id} & set(ids)


def test_digits_are_split_and_indentation_is_kept(stdlib_tokenizer):
    tokenizer = stdlib_tokenizer[0]
    assert [tokenizer.piece(i) for i in tokenizer.encode("4071")] == ["4", "0", "7", "1"]
    assert any(set(tokenizer.piece(i)) == {"▁"} and len(tokenizer.piece(i)) >= 4
               for i in tokenizer.encode("        return x"))


def test_decode_stops_at_eos_and_drops_pad_and_bos(stdlib_tokenizer):
    tokenizer = stdlib_tokenizer[0]
    ids = [tokenizer.bos_id] + tokenizer.encode("abc") + [tokenizer.eos_id] + tokenizer.encode("zzz")
    assert tokenizer.decode(ids) == "abc"
    assert tokenizer.decode(tokenizer.encode("abc") + [tokenizer.pad_id] * 3) == "abc"


def test_cached_model_is_reused_without_reading_the_corpus(stdlib_tokenizer):
    tokenizer, _, tok_cfg, data_cfg = stdlib_tokenizer
    again = pipeline.load_tokenizer(tok_cfg, data_cfg)
    assert again.source == tokenizer.source and again.source.endswith(".model")

    def corpus_must_not_be_read():
        raise AssertionError("texts_fn called although the model is cached")

    cached = tokenizer_lib.load_or_train(tok_cfg, data_cfg.dir, corpus_must_not_be_read,
                                         corpus_key=pipeline.corpus_key(data_cfg))
    assert cached.model_proto == tokenizer.model_proto


def test_explicit_path_loads_and_pickles(stdlib_tokenizer, tmp_path):
    tokenizer, _, tok_cfg, data_cfg = stdlib_tokenizer
    cfg = tokenizer_lib.default_tokenizer_config()
    cfg.path = tokenizer.source
    loaded = pipeline.load_tokenizer(cfg, data_cfg)
    assert loaded.encode(CODE) == tokenizer.encode(CODE)
    assert pickle.loads(pickle.dumps(loaded)).encode(TASK) == tokenizer.encode(TASK)


def test_missing_model_path_names_the_key(tmp_path):
    cfg = tokenizer_lib.default_tokenizer_config()
    cfg.path = str(tmp_path / "nope.model")
    with pytest.raises(ConfigError, match="tokenizer.path"):
        tokenizer_lib.load_or_train(cfg, str(tmp_path), lambda: iter(()))


@pytest.mark.parametrize("key,value", [("vocab_size", 100), ("model_type", "wordpiece"), ("max_train_chars", 0)])
def test_bad_settings_name_the_key(tmp_path, key, value):
    cfg = tokenizer_lib.default_tokenizer_config()
    cfg[key] = value
    with pytest.raises(ConfigError, match=f"tokenizer.{key}"):
        tokenizer_lib.load_or_train(cfg, str(tmp_path), lambda: iter(()))


def test_unigram_model_type_trains():
    texts = [open(path, encoding="utf-8").read() for path in (json.__file__, textwrap.__file__, string.__file__)]
    proto = tokenizer_lib.train_model_proto(texts + [TASK], vocab_size=400, model_type="unigram",
                                            max_train_chars=100_000)
    tokenizer = tokenizer_lib.Tokenizer(proto)
    assert tokenizer.vocab_size == 400
    assert tokenizer.decode(tokenizer.encode(TASK)) == TASK


def test_a_corpus_too_small_for_the_vocabulary_names_the_key():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        tokenizer_lib.train_model_proto([TASK], vocab_size=2048, max_train_chars=10_000)


# ------------------------------------------------------------------------ GPT-2 byte-level BPE

GPT2_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("Ġw", "o")]


@pytest.fixture()
def gpt2_files(tmp_path):
    """vocab.json + merges.txt in GPT-2's format: the 256 byte tokens, the merges' tokens, <|endoftext|>."""
    tokens = list(tokenizer_lib.bytes_to_unicode().values()) + [a + b for a, b in GPT2_MERGES] + ["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in GPT2_MERGES),
                                         encoding="utf-8")
    return tmp_path


def gpt2_config(path):
    cfg = tokenizer_lib.default_tokenizer_config()
    cfg.kind, cfg.path = "gpt2_bpe", str(path)
    return cfg


def test_gpt2_byte_map_and_pretokenizer_are_gpt2s():
    chars = tokenizer_lib.bytes_to_unicode()
    assert (chars[ord(" ")], chars[ord("\n")], chars[ord("a")]) == ("Ġ", "Ċ", "a")
    assert len(set(chars.values())) == 256
    split = tokenizer_lib.gpt2_pretokenizer().findall("Hello world, it's 2024!  ok\n\n  x² 日本")
    assert split == ["Hello", " world", ",", " it", "'s", " 2024", "!", " ", " ok", "\n\n ", " x", "²", " 日本"]


def test_gpt2_bpe_applies_merges_by_rank(gpt2_files):
    tok = tokenizer_lib.load_or_train(gpt2_config(gpt2_files), "", lambda: iter(()))
    assert tok.vocab_size == 256 + len(GPT2_MERGES) + 1 and tok.eos_id == tok.pad_id == tok.bos_id == 262
    ids = tok.encode("hello world")
    assert [tok.piece(i) for i in ids] == ["hello", "Ġwo", "r", "l", "d"]
    assert tok.decode(ids + [tok.eos_id] + tok.encode("junk")) == "hello world"
    for text in (CODE, TASK, "日本語 and emoji 🙂", "<|endoftext|> is text here"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id not in tok.encode("<|endoftext|>")
    assert pickle.loads(pickle.dumps(tok)).encode(CODE) == tok.encode(CODE)


def test_gpt2_bpe_missing_files_name_the_key(gpt2_files, tmp_path):
    (gpt2_files / "merges.txt").unlink()
    with pytest.raises(ConfigError, match="tokenizer.path=.*no merges.txt"):
        tokenizer_lib.load_or_train(gpt2_config(gpt2_files), "", lambda: iter(()))
    with pytest.raises(ConfigError, match="tokenizer.path"):
        tokenizer_lib.validate_tokenizer_config(gpt2_config(""))
    cfg = gpt2_config(gpt2_files)
    cfg.kind = "wordpiece"
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        tokenizer_lib.validate_tokenizer_config(cfg)


def test_gpt2_bpe_matches_hugging_face_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the `hf` extra (pip install -e '.[hf]') is not installed")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    reference = tokenizers.Tokenizer(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    texts = [open(path, encoding="utf-8").read() for path in (json.__file__, textwrap.__file__)] + [TASK]
    reference.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    reference.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "files").mkdir()
    reference.model.save(str(tmp_path / "files"))
    from_json = tokenizer_lib.ByteLevelBPETokenizer.from_path(str(tmp_path / "tokenizer.json"))
    from_files = tokenizer_lib.ByteLevelBPETokenizer.from_path(str(tmp_path / "files"))
    assert from_json.vocab_size == from_files.vocab_size == reference.get_vocab_size()
    for text in [CODE, TASK, "  spaces \n\n\t tabs  ", "it's we'll THEY'RE", "Ⅻ ½ x² 日本語 🙂", texts[0][:3000]]:
        assert from_json.encode(text) == from_files.encode(text) == reference.encode(text).ids
        assert from_json.decode(from_json.encode(text)) == text
