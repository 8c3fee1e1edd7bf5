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
