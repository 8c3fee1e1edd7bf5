import json
import re

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructgpt_jax.data import mixture, pipeline, tokenizer as tokenizer_lib
from instructgpt_jax.errors import ConfigError, DataError

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"doc{i} says hello world {i * 7}. " * 5 for i in range(200)] + [
        "Reverse the words: map bag key\nAnswer: key bag map\n" * 20]
    return tokenizer_lib.Tokenizer(tokenizer_lib.train_model_proto(texts, vocab_size=300, max_train_chars=50_000))


def corpus(root, n_files, word):
    """n_files documents, each naming itself (`<word>17`) so that every token can be traced to its file."""
    root.mkdir(parents=True)
    for i in range(n_files):
        (root / f"{word}{i}.txt").write_text(f"{word}{i} " * (3 + i % 4))
    return str(root)


@pytest.fixture
def data_cfg(tmp_path):
    cfg = pipeline.default_data_config()
    cfg.dir = str(tmp_path / "data")
    cfg.validation_fraction = 0.2
    cfg.shuffle_window = 8
    cfg.sources = {
        "small": pipeline.text_source_config("text", 0.6, path=corpus(tmp_path / "small", 2, "s")),
        "large": pipeline.text_source_config("text", 0.4, path=corpus(tmp_path / "large", 200, "l")),
    }
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def complete_documents(tokenizer, rows):
    """Texts that lie between two EOS tokens within a row (whole documents, not cut by packing)."""
    docs = []
    for row in rows:
        eos = np.flatnonzero(row == tokenizer.eos_id)
        docs += [tokenizer.decode(row[a + 1:b]) for a, b in zip(eos[:-1], eos[1:])]
    return docs


def test_batches_have_the_documented_shapes(data_cfg, tokenizer):
    batch = next(pipeline.lm_batches(data_cfg, tokenizer, SEQ_LEN, 8, "train", seed=0))
    assert batch["tokens"].shape == (8, SEQ_LEN + 1) and batch["tokens"].dtype == np.int32
    assert batch["source"].shape == (8,)


def test_weights_not_sizes_set_the_mixture(data_cfg, tokenizer):
    """Sources of 2 and 200 documents with weights 0.6 / 0.4 (GPT-3 §2.2): the small one is repeated."""
    it = pipeline.lm_batches(data_cfg, tokenizer, SEQ_LEN, 8, "train", seed=0)
    batches = take(it, 60)
    names = list(mixture.mixture_weights(data_cfg))  # `source` indexes this order
    realised = mixture.realised_mixture([b["source"] for b in batches], names)
    assert realised["small"] == pytest.approx(0.6, abs=0.02)
    assert realised["large"] == pytest.approx(0.4, abs=0.02)
    for b in batches:  # every row's tokens come from the source it is tagged with
        for row, source in zip(b["tokens"], b["source"]):
            words = set(re.findall(r"[sl](?=\d)", tokenizer.decode([t for t in row if t != tokenizer.eos_id])))
            assert words <= {names[source][0]}


def test_packing_concatenates_documents_with_eos_and_no_padding(data_cfg, tokenizer):
    data_cfg.sources = {"large": data_cfg.sources.large}
    rows = np.concatenate([b["tokens"] for b in take(
        pipeline.lm_batches(data_cfg, tokenizer, SEQ_LEN, 4, "validation", seed=0), 20)])
    assert tokenizer.pad_id not in rows
    # The validation stream is unshuffled: consecutive rows continue each other.
    stream = rows.ravel()
    complete = complete_documents(tokenizer, [stream])
    assert len(complete) >= 10
    assert all(re.fullmatch(r"(l\d+ )+", d) and len(set(d.split())) == 1 for d in complete)


def test_state_round_trips_through_json(data_cfg, tokenizer):
    for window in (0, 8):  # packing state alone, and behind a shuffle window
        data_cfg.shuffle_window = window
        it = pipeline.lm_batches(data_cfg, tokenizer, SEQ_LEN, 4, "train", seed=3)
        take(it, 7)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 5)
        fresh = pipeline.lm_batches(data_cfg, tokenizer, SEQ_LEN, 4, "train", seed=3)
        fresh.set_state(state)
        for want, got in zip(expected, take(fresh, 5)):
            np.testing.assert_array_equal(want["tokens"], got["tokens"])
            np.testing.assert_array_equal(want["source"], got["source"])


def test_packing_state_survives_json_when_no_document_is_split():
    """grain's packing state holds tuples; JSON makes them lists, which it would misread as a remainder
    and silently drop a document on restore."""
    docs = grain.MapDataset.range(100).map(lambda i: np.full(4, i, np.int32)).to_iter_dataset()
    packed = pipeline.with_json_state(mixture.pack_sequences(docs, 8))
    it = iter(packed)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    fresh = iter(packed)
    fresh.set_state(state)
    for want, got in zip(expected, take(fresh, 3)):
        np.testing.assert_array_equal(want, got)


def test_seed_changes_the_order_and_validation_is_fixed(data_cfg, tokenizer):
    first = lambda split, seed: next(pipeline.lm_batches(data_cfg, tokenizer, SEQ_LEN, 8, split, seed=seed))["tokens"]
    assert not np.array_equal(first("train", 0), first("train", 1))
    np.testing.assert_array_equal(first("train", 0), first("train", 0))
    np.testing.assert_array_equal(first("validation", 0), first("validation", 5))


def test_each_process_reads_its_own_shard(data_cfg, tokenizer):
    data_cfg.sources = {"large": data_cfg.sources.large}
    seen = []
    for process_index in range(2):
        it = pipeline.lm_batches(data_cfg, tokenizer, 64, 8, "train", seed=0,
                                 process_index=process_index, process_count=2)
        batches = take(it, 20)
        assert batches[0]["tokens"].shape == (4, 65)
        documents = complete_documents(tokenizer, [row for b in batches for row in b["tokens"]])
        seen.append({word for doc in documents for word in doc.split()})
    assert len(seen[0]) > 40 and len(seen[1]) > 40 and not seen[0] & seen[1]
    with pytest.raises(ConfigError, match="divisible"):
        pipeline.lm_batches(data_cfg, tokenizer, SEQ_LEN, 9, "train", seed=0, process_index=0, process_count=2)


def test_to_global_batch_shards_rows_over_8_devices():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    local = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "source": np.arange(8, dtype=np.int32)}
    out = pipeline.to_global_batch(local, NamedSharding(mesh, P("data", None)))
    assert out["tokens"].shape == (8, 5) and out["source"].shape == (8,)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), local["tokens"])
    for shard in out["tokens"].addressable_shards:
        assert shard.data.shape == (1, 5)
        np.testing.assert_array_equal(np.asarray(shard.data), local["tokens"][shard.index])
    assert out["tokens"].sharding.spec == P("data", None) and out["source"].sharding.spec == P("data")


def test_sft_example_masks_the_prompt_and_pads_on_the_right():
    ex = pipeline.sft_example([10, 11, 12], [20, 21], eos_id=1, pad_id=0, seq_len=8)
    np.testing.assert_array_equal(ex["tokens"], [10, 11, 12, 20, 21, 1, 0, 0, 0])
    # loss_mask[t] weighs predicting tokens[t + 1]: the two completion tokens and EOS.
    np.testing.assert_array_equal(ex["loss_mask"], [0, 0, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("overlong", ["truncate", "drop", "error"])
def test_sft_batches_handle_overlong_demonstrations(tmp_path, tokenizer, overlong):
    cfg = pipeline.default_data_config()
    cfg.dir = str(tmp_path / "data")
    cfg.validation_fraction = 0.0
    cfg.demonstrations.overlong = overlong
    records = [{"prompt": "Reverse the words: map bag\nAnswer:", "completion": " bag map"}] * 5
    records.insert(3, {"prompt": "Reverse the words: key\nAnswer:", "completion": " key" * 40})
    cfg.demonstrations.path = str(tmp_path / "demos.jsonl")
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if overlong == "error":
        with pytest.raises(DataError, match=r"demos.jsonl:4: .*longer than"):
            pipeline.sft_batches(cfg, tokenizer, 48, 2, "train", seed=0)
        return
    it = pipeline.sft_batches(cfg, tokenizer, 48, 2, "train", seed=0)
    completions = []
    for b in take(it, 6):
        assert b["tokens"].shape == (2, 49) and b["loss_mask"].shape == (2, 48)
        assert b["loss_mask"].dtype == np.float32
        for tokens, mask in zip(b["tokens"], b["loss_mask"]):
            targets = tokens[1:][mask > 0]
            completions.append(tokenizer.decode(targets))
            assert (targets[-1] == tokenizer.eos_id) == (completions[-1] == " bag map")
    truncated = {c for c in completions if c != " bag map"}
    if overlong == "truncate":  # cut at 49 tokens: no EOS, and the loss still only on the completion
        assert len(truncated) == 1 and truncated.pop().startswith(" key key")
    else:
        assert not truncated
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    fresh = pipeline.sft_batches(cfg, tokenizer, 48, 2, "train", seed=0)
    fresh.set_state(state)
    for want, got in zip(expected, take(fresh, 3)):
        np.testing.assert_array_equal(want["tokens"], got["tokens"])
