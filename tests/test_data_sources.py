import json
import os
import sys
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from instructgpt_jax.data import pipeline, sources
from instructgpt_jax.errors import ConfigError, DataError


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def data_config(tmp_path, **sources_cfg):
    cfg = pipeline.default_data_config()
    cfg.dir = str(tmp_path / "data")
    cfg.validation_fraction = 0.3
    if sources_cfg:
        cfg.sources = sources_cfg
    return cfg


@pytest.fixture
def fake_tasks(monkeypatch, tmp_path):
    """Stands in for data/tasks.py: an endless deterministic stream of task text per (seed, split)."""
    module = types.ModuleType("instructgpt_jax.data.tasks")
    module.__file__ = write(tmp_path / "fake_tasks.py", "# version 1\n")

    def pretraining_documents(seed, split):
        i = 0
        while True:
            yield f"[{split} {seed}] Add: {i} + {i + 1}\nAnswer: {2 * i + 1}"
            i += 1

    module.pretraining_documents = pretraining_documents
    monkeypatch.setitem(sys.modules, "instructgpt_jax.data.tasks", module)
    return module


def test_every_kind_builds_offline_without_tensorflow(tmp_path, fake_tasks):
    corpus = tmp_path / "corpus"
    for i in range(6):
        write(corpus / f"sub{i % 2}" / f"doc{i}.txt", f"document {i}\n  indented line\n")
    cfg = data_config(
        tmp_path,
        text=pipeline.text_source_config("text", 1.0, path=str(corpus)),
        tasks=pipeline.text_source_config("tasks", 1.0, num_documents=30, num_validation_documents=5),
    )
    text = sources.build_text_source("text", cfg)
    docs = [ex for split in ("train", "validation") for ex in sources.read_examples(text, split)]
    assert sorted(d["text"] for d in docs) == sorted(f"document {i}\n  indented line\n" for i in range(6))
    assert len(text.split("validation")) >= 1

    tasks = sources.build_text_source("tasks", cfg)
    assert len(tasks.split("train")) == 30 and len(tasks.split("validation")) == 5
    assert {ex["text"] for ex in sources.read_examples(tasks, "validation")} == {
        f"[validation 0] Add: {i} + {i + 1}\nAnswer: {2 * i + 1}" for i in range(5)}

    cfg.demonstrations.path = write(tmp_path / "demos.jsonl", jsonl(
        *[{"prompt": f"Q{i}", "completion": f"A{i}", "task": "add"} for i in range(8)]))
    cfg.comparisons.path = write(tmp_path / "cmp.jsonl", jsonl(
        {"prompt": "P1", "responses": ["best", "mid", "worst"]}, {"prompt": "P2", "chosen": "good", "rejected": ""}))
    cfg.prompts.path = write(tmp_path / "prompts.jsonl", jsonl({"prompt": "hello"}, {"prompt": "world"}))
    demos = sources.build_jsonl_source("demonstrations", cfg)
    all_demos = [ex for split in demos.splits for ex in sources.read_examples(demos, split)]
    assert sorted((d["line"], d["prompt"], d["completion"]) for d in all_demos) == [
        (i + 1, f"Q{i}", f"A{i}") for i in range(8)]
    assert json.loads(all_demos[0]["meta"]) == {"task": "add"}
    comparisons = sources.build_jsonl_source("comparisons", cfg)
    responses = {ex["prompt"]: ex["responses"] for s in comparisons.splits
                 for ex in sources.read_examples(comparisons, s)}
    assert responses == {"P1": ["best", "mid", "worst"], "P2": ["good", ""]}
    prompts = sources.build_jsonl_source("prompts", cfg)
    assert sorted(ex["prompt"] for s in prompts.splits for ex in sources.read_examples(prompts, s)) == [
        "hello", "world"]
    assert "tensorflow" not in sys.modules


def test_split_is_a_deterministic_hash_of_the_relative_path(tmp_path):
    corpus = tmp_path / "corpus"
    for i in range(40):
        write(corpus / f"f{i:02d}.txt", f"text {i}")
    cfg = data_config(tmp_path, c=pipeline.text_source_config("text", 1.0, path=str(corpus)))
    built = sources.build_text_source("c", cfg)
    validation = {ex["path"] for ex in sources.read_examples(built, "validation")}
    assert validation == {f"f{i:02d}.txt" for i in range(40) if sources.in_validation(f"f{i:02d}.txt", 0.3)}
    assert 0 < len(validation) < 40


def test_unchanged_inputs_are_reused_and_changed_inputs_rebuild(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    write(corpus / "b.txt", "beta")
    cfg = data_config(tmp_path, c=pipeline.text_source_config("text", 1.0, path=str(corpus)))
    first = sources.build_text_source("c", cfg)
    info = os.path.join(first.directory, "dataset_info.json")
    built_at = os.stat(info).st_mtime_ns
    again = sources.build_text_source("c", cfg)
    assert again.directory == first.directory and os.stat(info).st_mtime_ns == built_at
    write(corpus / "b.txt", "beta, edited")
    changed = sources.build_text_source("c", cfg)
    assert changed.directory != first.directory
    texts = {ex["text"] for s in changed.splits for ex in sources.read_examples(changed, s)}
    assert texts == {"alpha", "beta, edited"}


def test_stdlib_source_is_python_code_without_tests_or_site_packages(tmp_path):
    cfg = data_config(tmp_path, stdlib=pipeline.text_source_config("stdlib", 1.0))
    built = sources.build_text_source("stdlib", cfg)
    train = built.split("train")
    assert len(train) > 100
    paths = [sources.to_python(train[i])["path"] for i in range(0, len(train), 7)]
    assert all(p.endswith(".py") for p in paths)
    assert not any(part in ("test", "tests", "site-packages") for p in paths for part in p.split(os.sep))


class LocalCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for a registered tfds dataset (lm1b, c4) that the user prepared under data.dir."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"content": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"content": f"line {i}"}


def test_a_prepared_tfds_dataset_is_a_text_source(tmp_path):
    cfg = data_config(tmp_path, web=pipeline.text_source_config(
        "tfds", 1.0, path="local_corpus", text_feature="content", validation_split="test"))
    LocalCorpus(data_dir=cfg.dir, file_format="array_record").download_and_prepare()
    built = sources.build_text_source("web", cfg)
    assert built.text_feature == "content"
    assert len(built.split("train")) == 5 and len(built.split("validation")) == 2
    cfg.sources.web.path = "lm1b"
    with pytest.raises(ConfigError, match="data.sources.web.path"):
        sources.build_text_source("web", cfg)
    assert "tensorflow" not in sys.modules


BAD_CASES = {
    "malformed json": ("demonstrations", jsonl({"prompt": "a", "completion": "b"}) + '{"prompt": "x",\n', 2),
    "missing field": ("demonstrations", jsonl({"prompt": "a"}), 1),
    "empty field": ("prompts", jsonl({"prompt": "ok"}, {"prompt": "ok2"}, {"prompt": "   "}), 3),
    "not an object": ("prompts", jsonl({"prompt": "ok"}) + "[1, 2]\n", 2),
    "K < 2": ("comparisons", jsonl({"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["a"]}), 2),
    "non-utf8": ("prompts", jsonl({"prompt": "ok"}, {"prompt": "ok"}).encode() + b'{"prompt": "\xff\xfe"}\n', 3),
    "empty file": ("prompts", "", 1),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_jsonl_names_file_and_line(tmp_path, case):
    kind, content, line = BAD_CASES[case]
    cfg = data_config(tmp_path)
    cfg[kind].path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=f"bad.jsonl:{line}: "):
        sources.build_jsonl_source(kind, cfg)


def test_non_utf8_text_file_names_file_and_line(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "good.txt", "fine")
    write(corpus / "latin1.txt", "first line\nsecond line caf\xe9\n".encode("latin-1"))
    cfg = data_config(tmp_path, c=pipeline.text_source_config("text", 1.0, path=str(corpus)))
    with pytest.raises(DataError, match="latin1.txt:2: not valid UTF-8"):
        sources.build_text_source("c", cfg)


def test_skip_mode_counts_bad_records(tmp_path):
    cfg = data_config(tmp_path)
    cfg.on_bad_record = "skip"
    good = [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(3)]
    content = (jsonl(good[0]) + "{oops\n" + jsonl(good[1], {"prompt": "p", "responses": ["only one"]})
               + "\n" + jsonl({"responses": ["a", "b"]}, good[2]))
    cfg.comparisons.path = write(tmp_path / "cmp.jsonl", content)
    built = sources.build_jsonl_source("comparisons", cfg)
    assert built.bad_records == 3
    assert sorted(ex["line"] for s in built.splits for ex in sources.read_examples(built, s)) == [1, 3, 7]
    again = sources.build_jsonl_source("comparisons", cfg)
    assert again.bad_records == 3  # read back from the built dataset's metadata


def test_skip_mode_counts_undecodable_text_files(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "alpha")
    write(corpus / "b.txt", "beta")
    write(corpus / "empty.py", "")
    write(corpus / "bad.txt", b"\xff")
    cfg = data_config(tmp_path, c=pipeline.text_source_config("text", 1.0, path=str(corpus)))
    cfg.on_bad_record = "skip"
    built = sources.build_text_source("c", cfg)
    assert built.bad_records == 1
    assert sorted(ex["text"] for s in built.splits for ex in sources.read_examples(built, s)) == ["alpha", "beta"]


@pytest.mark.parametrize("mutate,key", [
    (lambda c: setattr(c.sources.stdlib, "weight", -1.0), "data.sources.stdlib.weight"),
    (lambda c: [setattr(s, "weight", 0.0) for s in c.sources.values()], "weight"),
    (lambda c: setattr(c.sources.stdlib, "kind", "webtext"), "data.sources.stdlib.kind"),
    (lambda c: setattr(c, "on_bad_record", "ignore"), "data.on_bad_record"),
    (lambda c: setattr(c.demonstrations, "overlong", "wrap"), "data.demonstrations.overlong"),
])
def test_config_errors_name_the_key(mutate, key):
    cfg = pipeline.default_data_config()
    pipeline.validate_data_config(cfg)
    mutate(cfg)
    with pytest.raises(ConfigError, match=key):
        pipeline.validate_data_config(cfg)


def test_default_config_shape():
    cfg = pipeline.default_data_config()
    assert {name: s.weight for name, s in cfg.sources.items()} == {"stdlib": 0.6, "tasks": 0.4}
    assert cfg.sources.stdlib.kind == "stdlib" and cfg.sources.tasks.kind == "tasks"
    assert np.isclose(sum(s.weight for s in cfg.sources.values()), 1.0)
