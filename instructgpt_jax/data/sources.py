"""Data sources as tensorflow-datasets builders written to array_record (no TensorFlow needed).

Each builder takes its inputs as a `BuilderConfig` whose name is a hash of the inputs (paths, sizes,
mtimes, settings), so a built dataset lives at `<data.dir>/<builder>/<source>_<hash>/<version>`:
changed inputs rebuild, unchanged ones are reused. Reading goes through `builder.as_data_source()`,
a random-access sequence that grain can shuffle and shard.

Kinds: text files (a directory, glob or file; one document per file), the Python standard library
(text files with a default path), the instruction-task suite (`data/tasks.py`), any tfds dataset
already prepared under `data.dir`, and JSONL demonstrations, comparisons and prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob as globlib
import hashlib
import importlib
import inspect
import io
import itertools
import json
import logging as pylogging
import os
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from instructgpt_jax.errors import ConfigError, DataError

TEXT_KINDS = ("text", "stdlib", "tasks", "tfds")
JSONL_KINDS = ("demonstrations", "comparisons", "prompts")
JSONL_PARSER_VERSION = 2  # part of a built JSONL source's name: stricter checks rebuild old builds (2: ties, 'ended')


class _QuietExpectedWarnings(pylogging.Filter):
    """tfds warns on every load that our hash-named configs are custom, and on every fresh build that the
    version folder has no dataset_info.json yet: both are expected here."""

    def filter(self, record):
        return not record.getMessage().startswith(("Using custom data configuration", "Variant folder"))


pylogging.getLogger("absl").addFilter(_QuietExpectedWarnings())
tfds.disable_progress_bar()


def data_dir(data_cfg: ml_collections.ConfigDict) -> str:
    return os.path.abspath(os.path.expanduser(data_cfg.dir))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic split: a key (relative path, prompt) is in validation iff its hash falls below."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def _stat_list(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    return [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]


# ---------------------------------------------------------------------------------------------------
# Record checks: each problem names the file and line; "skip" mode counts it in the dataset metadata.


class Problems:
    """Bad-record policy: raise DataError (`on_bad_record="error"`) or count and skip (`"skip"`)."""

    def __init__(self, mode: str, metadata: dict):
        self.mode, self.metadata = mode, metadata
        metadata.setdefault("bad_records", 0)
        metadata.setdefault("bad_examples", [])

    def report(self, where: str, message: str) -> None:
        if self.mode == "error":
            raise DataError(f"{where}: {message}")
        self.metadata["bad_records"] += 1
        if len(self.metadata["bad_examples"]) < 5:
            self.metadata["bad_examples"].append(f"{where}: {message}")


class _RecordError(ValueError):
    pass


def decode_utf8(data: bytes, path: str, problems: Problems, first_line: int = 1) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        problems.report(f"{path}:{line}", f"not valid UTF-8 ({e.reason} at byte {e.start})")
        return None


def _text_field(obj: dict, field: str, allow_empty: bool = False) -> str:
    value = obj.get(field)
    if value is None:
        raise _RecordError(f"missing field {field!r}")
    if not isinstance(value, str):
        raise _RecordError(f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _RecordError(f"field {field!r} is empty")
    return value


def _meta(obj: dict, used: Sequence[str]) -> str:
    """Fields the schema does not use (e.g. a task's answer key), kept as a JSON string."""
    return json.dumps({k: v for k, v in obj.items() if k not in used}, sort_keys=True)


def parse_prompt(obj: dict) -> dict:
    return {"prompt": _text_field(obj, "prompt"), "meta": _meta(obj, ["prompt"])}


def parse_demonstration(obj: dict) -> dict:
    return {"prompt": _text_field(obj, "prompt"), "completion": _text_field(obj, "completion"),
            "meta": _meta(obj, ["prompt", "completion"])}


def parse_comparison(obj: dict) -> dict:
    """`{"prompt", "responses": [best first...]}`, or `{"prompt", "chosen", "rejected"}` as K=2."""
    if "responses" in obj:
        responses = obj["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise _RecordError("field 'responses' must be a list of strings (best first)")
        used = ["prompt", "responses"]
    elif "chosen" in obj or "rejected" in obj:
        responses = [_text_field(obj, "chosen", allow_empty=True), _text_field(obj, "rejected", allow_empty=True)]
        used = ["prompt", "chosen", "rejected"]
    else:
        raise _RecordError("missing field 'responses' (or 'chosen' and 'rejected')")
    if len(responses) < 2:
        raise _RecordError(f"a comparison needs K >= 2 responses, got {len(responses)}")
    first = {}
    for k, response in enumerate(responses):
        if response in first:  # a tie: the same text at two ranks says nothing (or contradicts itself)
            raise _RecordError(f"responses {first[response] + 1} and {k + 1} are identical; a ranking needs "
                               "distinct responses (ties are not supported: drop the duplicates)")
        first[response] = k
    ended = obj.get("ended")
    if ended is not None and not (isinstance(ended, list) and len(ended) == len(responses)
                                  and all(isinstance(e, bool) for e in ended)):
        raise _RecordError(f"field 'ended' must be a list of {len(responses)} booleans, one per response")
    return {"prompt": _text_field(obj, "prompt"), "responses": responses, "meta": _meta(obj, used)}


def read_jsonl(path: str, parse, problems: Problems) -> list[tuple[int, dict]]:
    """(line number, parsed record) for each valid non-blank line; problems name `path:line`."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        problems.report(f"{path}:1", "empty file")
    parsed = []
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        text = decode_utf8(raw, path, problems, first_line=line)
        if text is None:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.report(f"{path}:{line}", f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        try:
            if not isinstance(obj, dict):
                raise _RecordError(f"expected a JSON object, got {type(obj).__name__}")
            parsed.append((line, parse(obj)))
        except _RecordError as e:
            problems.report(f"{path}:{line}", str(e))
    if not parsed:
        raise DataError(f"{path}: no valid records ({problems.metadata['bad_records']} skipped)")
    return parsed


# ---------------------------------------------------------------------------------------------------
# Text files


def list_text_files(path: str, glob: str, exclude: str, key: str) -> tuple[str, list[str]]:
    """(root, sorted relative paths) of a text source: a file, a directory + glob, or a glob pattern.

    Patterns match relative paths with fnmatch (`*` also crosses `/`; a leading `**/` is optional).
    Directories named in the comma-separated `exclude` are not entered.
    """
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
    if os.path.isdir(path):
        root, pattern = path, glob
    elif globlib.has_magic(path):
        root = _glob_root(path)
        pattern = os.path.relpath(path, root)
    else:
        raise ConfigError(f"{key}={path!r}: no such file or directory")
    excluded = {d for d in exclude.split(",") if d}
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in excluded)
        for filename in filenames:
            r = os.path.relpath(os.path.join(dirpath, filename), root)
            if fnmatch.fnmatch(r, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(r, pattern[3:])):
                rel.append(r)
    if not rel:
        raise ConfigError(f"{key}={path!r}: no files match (glob={glob!r}, exclude={exclude!r})")
    return os.path.abspath(root), sorted(rel)


def _glob_root(pattern: str) -> str:
    parts = pattern.split(os.sep)
    fixed = list(itertools.takewhile(lambda part: not globlib.has_magic(part), parts))
    return os.sep.join(fixed) or "."


def split_files(rel_paths: Sequence[str], fraction: float) -> dict[str, list[str]]:
    """Train/validation by hash of the relative path; validation gets >= 1 file when there are >= 2."""
    validation = [r for r in rel_paths if in_validation(r, fraction)]
    if not validation and len(rel_paths) >= 2 and fraction > 0:
        validation = [min(rel_paths, key=lambda r: hashlib.sha256(r.encode()).hexdigest())]
    if len(validation) == len(rel_paths):
        validation = validation[:-1]
    chosen = set(validation)
    return {"train": [r for r in rel_paths if r not in chosen], "validation": validation}


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    root: str = ""
    files: tuple[str, ...] = ()
    validation_fraction: float = 0.05
    on_bad_record: str = "error"


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: features from FEATURES, bad-record counts in the dataset's metadata.json."""

    VERSION = tfds.core.Version("1.0.0")
    FEATURES: Mapping[str, Any] = {}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(dict(self.FEATURES)), metadata=tfds.core.MetadataDict()
        )

    def _problems(self) -> Problems:
        return Problems(self.builder_config.on_bad_record, self.info.metadata)


class TextFiles(_Builder, skip_registration=True):
    """One example per file; empty files are skipped (counted in metadata as `empty_files`)."""

    FEATURES = {"text": tfds.features.Text(), "path": tfds.features.Text()}

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        problems = self._problems()
        self.info.metadata["empty_files"] = 0
        return {
            split: self._generate_examples(files, problems)
            for split, files in split_files(cfg.files, cfg.validation_fraction).items()
            if files
        }

    def _generate_examples(self, files, problems):
        root = self.builder_config.root
        for rel in files:
            path = os.path.join(root, rel)
            with open(path, "rb") as f:
                text = decode_utf8(f.read(), path, problems)
            if text is None:
                continue
            if not text.strip():
                self.info.metadata["empty_files"] += 1
                continue
            yield rel, {"text": text, "path": rel}


@dataclasses.dataclass
class TaskDocumentsConfig(tfds.core.BuilderConfig):
    seed: int = 0
    num_documents: int = 0
    num_validation_documents: int = 0


class TaskDocuments(_Builder, skip_registration=True):
    """The first N documents of `tasks.pretraining_documents(seed, split)` for each split."""

    FEATURES = {"text": tfds.features.Text()}

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        counts = {"train": cfg.num_documents, "validation": cfg.num_validation_documents}
        return {split: self._generate_examples(split, n) for split, n in counts.items()}

    def _generate_examples(self, split, n):
        stream = _tasks_module().pretraining_documents(self.builder_config.seed, split)
        for i, text in enumerate(itertools.islice(stream, n)):
            yield i, {"text": text}


def _tasks_module():
    return importlib.import_module("instructgpt_jax.data.tasks")


# ---------------------------------------------------------------------------------------------------
# JSONL: demonstrations, comparisons, prompts


@dataclasses.dataclass
class JsonlConfig(tfds.core.BuilderConfig):
    path: str = ""
    validation_fraction: float = 0.05
    on_bad_record: str = "error"


class _JsonlBuilder(_Builder, skip_registration=True):
    PARSE = staticmethod(parse_prompt)

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        parsed = read_jsonl(cfg.path, self.PARSE, self._problems())
        splits = {"train": [], "validation": []}
        for line, example in parsed:
            splits["validation" if in_validation(example["prompt"], cfg.validation_fraction) else "train"].append(
                (line, example)
            )
        if not splits["validation"] and len(parsed) >= 2 and cfg.validation_fraction > 0:
            splits["validation"].append(splits["train"].pop())
        return {split: self._generate_examples(items) for split, items in splits.items() if items}

    def _generate_examples(self, items):
        for line, example in items:
            yield line, {**example, "line": line}


_LINE = tfds.features.Scalar(dtype=np.int32)


class Demonstrations(_JsonlBuilder, skip_registration=True):
    FEATURES = {"prompt": tfds.features.Text(), "completion": tfds.features.Text(), "meta": tfds.features.Text(),
                "line": _LINE}
    PARSE = staticmethod(parse_demonstration)


class Comparisons(_JsonlBuilder, skip_registration=True):
    FEATURES = {"prompt": tfds.features.Text(), "responses": tfds.features.Sequence(tfds.features.Text()),
                "meta": tfds.features.Text(), "line": _LINE}
    PARSE = staticmethod(parse_comparison)


class Prompts(_JsonlBuilder, skip_registration=True):
    FEATURES = {"prompt": tfds.features.Text(), "meta": tfds.features.Text(), "line": _LINE}
    PARSE = staticmethod(parse_prompt)


_JSONL_BUILDERS = {"demonstrations": Demonstrations, "comparisons": Comparisons, "prompts": Prompts}


# ---------------------------------------------------------------------------------------------------
# Building and opening


@dataclasses.dataclass(frozen=True)
class BuiltSource:
    """A prepared dataset: random-access splits of feature dicts, plus what building it skipped."""

    name: str
    directory: str
    splits: Mapping[str, Sequence[dict]]
    text_feature: str = "text"
    bad_records: int = 0

    def split(self, split: str) -> Sequence[dict]:
        if split not in self.splits:
            raise DataError(f"{self.directory}: source {self.name!r} has no {split!r} split "
                            f"(has {sorted(self.splits)}); add more files or raise data.validation_fraction")
        return self.splits[split]


def _prepare(builder: tfds.core.DatasetBuilder, name: str) -> BuiltSource:
    if not builder.is_prepared():
        logging.info("Building data source %r into %s", name, builder.data_dir)
        with contextlib.redirect_stdout(io.StringIO()):  # tfds prints "Downloading and preparing..."
            builder.download_and_prepare()
    bad = int(builder.info.metadata.get("bad_records", 0)) if builder.info.metadata is not None else 0
    if bad:
        logging.warning("Data source %r: skipped %d bad records, e.g. %s", name, bad,
                        builder.info.metadata.get("bad_examples", [])[:3])
    return BuiltSource(name=name, directory=str(builder.data_dir), splits=builder.as_data_source(), bad_records=bad)


def _config_name(name: str, inputs: Any) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in name.lower())
    return f"{safe}_{_digest(inputs)}"


def _build_text_files(name: str, src, data_cfg, default_path: str = "") -> BuiltSource:
    key = f"data.sources.{name}.path"
    root, files = list_text_files(src.path or default_path, src.glob, src.exclude, key)
    settings = dict(root=root, files=tuple(files), validation_fraction=data_cfg.validation_fraction,
                    on_bad_record=data_cfg.on_bad_record)
    inputs = dict(settings, stats=_stat_list([os.path.join(root, f) for f in files]))
    config = TextFilesConfig(name=_config_name(name, inputs), **settings)
    builder = TextFiles(data_dir=data_dir(data_cfg), config=config, file_format="array_record")
    try:
        return _prepare(builder, name)
    except AssertionError as e:  # tfds: a split where every file was empty or skipped
        raise DataError(f"{root}: source {name!r} has no usable documents ({e})") from e


def _build_tasks(name: str, src, data_cfg) -> BuiltSource:
    module = _tasks_module()
    with open(inspect.getfile(module), "rb") as f:
        code_hash = hashlib.sha256(f.read()).hexdigest()
    settings = dict(seed=src.seed, num_documents=src.num_documents,
                    num_validation_documents=src.num_validation_documents)
    config = TaskDocumentsConfig(name=_config_name(name, dict(settings, code=code_hash)), **settings)
    return _prepare(TaskDocuments(data_dir=data_dir(data_cfg), config=config, file_format="array_record"), name)


def _open_prepared_tfds(name: str, src, data_cfg) -> BuiltSource:
    """A registered tfds dataset (e.g. `lm1b`, `c4/en:3.0.1`) prepared under data.dir; read from its files."""
    try:
        builder = tfds.core.read_only_builder.builder_from_files(src.path, data_dir=data_dir(data_cfg))
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(
            f"data.sources.{name}.path={src.path!r}: not prepared under data.dir={data_dir(data_cfg)!r}; "
            f"prepare it there first (e.g. `tfds build {src.path} --data_dir=... --file_format=array_record`)"
        ) from e
    if src.text_feature not in builder.info.features:
        raise ConfigError(f"data.sources.{name}.text_feature={src.text_feature!r}: dataset {src.path!r} has "
                          f"features {sorted(builder.info.features)}")
    wanted = {"train": src.train_split, "validation": src.validation_split}
    splits = {ours: builder.as_data_source(split=theirs) for ours, theirs in wanted.items()
              if theirs in builder.info.splits}
    return BuiltSource(name=name, directory=str(builder.data_dir), splits=splits, text_feature=src.text_feature)


def build_text_source(name: str, data_cfg: ml_collections.ConfigDict) -> BuiltSource:
    """Builds (or reuses) the text source `data.sources[name]`; documents are in feature `text_feature`."""
    src = data_cfg.sources[name]
    if src.kind == "text":
        return _build_text_files(name, src, data_cfg)
    if src.kind == "stdlib":
        return _build_text_files(name, src, data_cfg, default_path=sysconfig.get_paths()["stdlib"])
    if src.kind == "tasks":
        return _build_tasks(name, src, data_cfg)
    if src.kind == "tfds":
        return _open_prepared_tfds(name, src, data_cfg)
    raise ConfigError(f"data.sources.{name}.kind={src.kind!r}: expected one of {TEXT_KINDS}")


def build_jsonl_source(kind: str, data_cfg: ml_collections.ConfigDict) -> BuiltSource:
    """Builds (or reuses) the JSONL file at `data.<kind>.path` (kind: demonstrations|comparisons|prompts)."""
    key = f"data.{kind}.path"
    path = os.path.abspath(os.path.expanduser(data_cfg[kind].path))
    if not data_cfg[kind].path:
        raise ConfigError(f"{key}: no {kind} file configured")
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={data_cfg[kind].path!r}: no such file")
    settings = dict(path=path, validation_fraction=data_cfg.validation_fraction,
                    on_bad_record=data_cfg.on_bad_record)
    inputs = dict(settings, stats=_stat_list([path]), parser=JSONL_PARSER_VERSION)
    config = JsonlConfig(name=_config_name(kind, inputs), **settings)
    builder = _JSONL_BUILDERS[kind](data_dir=data_dir(data_cfg), config=config, file_format="array_record")
    return _prepare(builder, kind)


def to_python(value):
    """A tfds example as read back (bytes, arrays of bytes, numpy scalars) -> str / list / int."""
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_python(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def read_examples(built: BuiltSource, split: str) -> Iterator[dict]:
    """All examples of a split as Python values (for small sources and tests)."""
    source = built.split(split)
    for i in range(len(source)):
        yield to_python(source[i])
