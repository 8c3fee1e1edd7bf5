"""A catalogue of bad inputs, one case each, through the real entry point (`instructgpt_jax.main`).

Every case asserts: exit status 2, no traceback, exactly one `error: ...` line naming the file:line,
config key or directory at fault, and that an existing checkpoint directory (a tiny pretrain run made
once per module) is byte-for-byte untouched. Most cases call the entry point in-process (fast); two go
through `python -m instructgpt_jax.main` to show the CLI's output and exit status.
"""
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instructgpt_jax import main
from instructgpt_jax.data import tasks
from instructgpt_jax.stages import common
from instructgpt_jax.train import steps
from test_sft import VOCAB, write_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call_main(args, out=None) -> tuple[int, str]:
    """Runs the CLI's parse + main in this process: (exit status, stderr); stdout goes to `out` if given."""
    err, out = io.StringIO(), out if out is not None else io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main.main(main.parse_flags(["instructgpt_jax.main", *args]))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def tree_digest(path) -> str:
    """sha256 over the relative paths and bytes of every file under path."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


class Env:
    """Paths shared by the cases: data dir, tokenizer, a finished pretrain workdir, valid data files."""

    def __init__(self, root):
        self.root = root
        self.data_dir = str(root / "data")
        self.tokenizer = write_tokenizer(root / "tokenizer.model")
        self.pretrain = str(root / "pretrain")
        self.demos = str(root / "demos.jsonl")
        tasks.write_demonstrations(self.demos, 48, "train", tasks.Labeler(seed=0), seed=0)

    def common(self):
        return [f"--config.data.dir={self.data_dir}", f"--config.tokenizer.path={self.tokenizer}",
                f"--config.tokenizer.vocab_size={VOCAB}", "--config.data.sources.stdlib.weight=0.0",
                "--config.data.sources.tasks.num_documents=200", "--config.data.sources.tasks.num_validation_documents=20",
                "--config.train.progress_bar=False"]

    def pretrain_args(self, workdir, *extra):
        return ["--config=experiments/pretrain.py:size=test", f"--workdir={workdir}", *self.common(),
                "--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.log_every=2",
                "--config.train.eval_batches=1", *extra]

    def sft_args(self, workdir, *extra, demos=None):
        return ["--config=experiments/sft.py:size=test", f"--workdir={workdir}", *self.common(),
                f"--config.init.params={self.pretrain}", f"--config.data.demonstrations.path={demos or self.demos}",
                "--config.sft.gold_eval_prompts=0", *extra]

    def rm_args(self, workdir, comparisons, *extra):
        return ["--config=experiments/rm.py:size=test", f"--workdir={workdir}", *self.common(),
                f"--config.init.params={self.pretrain}", f"--config.data.demonstrations.path={self.demos}",
                f"--config.data.comparisons.path={comparisons}", *extra]

    def copy_pretrain(self, dest) -> str:
        shutil.copytree(self.pretrain, dest)
        return str(dest)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("catalogue"))
    code, err = call_main(e.pretrain_args(e.pretrain))
    assert code == 0, err[-3000:]
    assert sorted(os.listdir(os.path.join(e.pretrain, "checkpoints"))) == ["2", "4"]
    return e


def write_lines(path, lines) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode())
            f.write(b"\n")
    return str(path)


GOOD_DEMO = {"prompt": "Repeat: cat dog\nAnswer:", "completion": " cat dog"}
GOOD_COMPARISON = {"prompt": "Repeat: cat dog\nAnswer:", "responses": [" cat dog", " dog", " cat"]}


# ---------------------------------------------------------------------------------------------------
# The cases: each returns (argv, regex the error line must match); `copy` is a copy of the pretrain
# workdir for cases that run on (and must not damage) a workdir with checkpoints of its own.

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def unknown_config_key(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.model.d_modle=32"), \
        r"unknown config key 'config\.model\.d_modle' \(Did you mean \"d_model\""


@case
def wrong_type_of_config_value(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.train.steps=ten"), r"--config\.train\.steps=ten: invalid literal for int"


@case
def unknown_config_argument(env, tmp, copy, monkeypatch):
    args = env.pretrain_args(env.pretrain)
    args[0] = "--config=experiments/pretrain.py:sise=test"
    return args, r"--config=experiments/pretrain.py:sise=test: unknown config argument 'sise'"


@case
def unknown_model_size(env, tmp, copy, monkeypatch):
    args = env.pretrain_args(env.pretrain)
    args[0] = "--config=experiments/pretrain.py:size=huge"
    return args, r"unknown model size 'huge' \(key: size\)"


@case
def missing_config_file(env, tmp, copy, monkeypatch):
    args = env.pretrain_args(env.pretrain)
    args[0] = "--config=experiments/pretrian.py:size=test"
    return args, r"--config=experiments/pretrian.py:size=test: no such config file 'experiments/pretrian.py'"


@case
def d_model_not_divisible_by_heads(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.model.n_heads=3"), \
        r"model\.d_model=64 is not divisible by model\.n_heads=3"


@case
def sparse_block_size_not_dividing_context(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.model.attention.layers=fixed",
                             "--config.model.attention.block_size=24"), \
        r"model\.attention\.block_size=24 must divide the sequence length 64"


@case
def seq_len_longer_than_context(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.train.seq_len=128"), r"train\.seq_len=128 exceeds model\.max_len=64"


@case
def mesh_not_matching_device_count(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.mesh.data=3"), r"mesh .*mesh\.data': 3.* does not fit 8 devices"


@case
def infinite_learning_rate(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.optim.lr=inf"), r"optim\.lr=inf must be finite"


@case
def bad_nonfinite_mode(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.optim.nonfinite=ignore"), \
        r"optim\.nonfinite must be skip or stop, got 'ignore'"


@case
def missing_tokenizer_model(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, f"--config.tokenizer.path={tmp}/nope.model"), \
        rf"tokenizer\.path='{tmp}/nope\.model': no such file"


@case
def corrupt_tokenizer_model(env, tmp, copy, monkeypatch):
    path = tmp / "garbage.model"
    path.write_bytes(b"\x00\x01 not a sentencepiece model " * 10)
    return env.pretrain_args(env.pretrain, f"--config.tokenizer.path={path}"), \
        rf"tokenizer\.path='{path}': not a readable tokenizer model"


@case
def vocab_size_mismatch(env, tmp, copy, monkeypatch):
    return env.pretrain_args(env.pretrain, "--config.tokenizer.vocab_size=512"), \
        rf"the tokenizer {env.tokenizer} has {VOCAB} pieces but model\.vocab_size=512"


@case
def workdir_not_writable(env, tmp, copy, monkeypatch):
    blocker = tmp / "a_file"
    blocker.write_text("not a directory")
    return env.pretrain_args(blocker / "run"), rf"--workdir={blocker}/run: cannot write there \(Not a directory\)"


@case
def checkpoint_of_a_different_model_shape(env, tmp, copy, monkeypatch):
    return env.pretrain_args(copy, "--config.model.n_layers=3"), \
        rf"checkpoint {copy}/checkpoints/4 does not match this config's model.*config keys changed since the run " \
        r"that wrote it: model\.n_layers: 2 -> 3 \(its config\.json is kept"


@case
def missing_earlier_stage_checkpoint(env, tmp, copy, monkeypatch):
    args = env.sft_args(tmp / "sft", f"--config.init.params={tmp}/nowhere")
    return args, rf"init\.params='{tmp}/nowhere': no checkpoint in {tmp}/nowhere/checkpoints"


@case
def earlier_stage_checkpoint_of_a_different_shape(env, tmp, copy, monkeypatch):
    return env.sft_args(tmp / "sft", "--config.model.n_layers=3"), \
        rf"cannot load params from {env.pretrain}/checkpoints/4: model shapes differ"


@case
def corrupt_earlier_stage_checkpoint(env, tmp, copy, monkeypatch):
    # An earlier stage's checkpoint is never replaced by an older one: a garbled latest step is an error.
    for root, _, files in os.walk(os.path.join(copy, "checkpoints", "4", "state")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
    return env.sft_args(tmp / "sft", f"--config.init.params={copy}"), \
        rf"cannot load params from {copy}/checkpoints/4: .*corrupt"


@case
def every_checkpoint_of_the_workdir_corrupt(env, tmp, copy, monkeypatch):
    for step in ("2", "4"):
        for root, _, files in os.walk(os.path.join(copy, "checkpoints", step, "state")):
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    return env.pretrain_args(copy, "--config.train.steps=6"), rf"checkpoint {copy}/checkpoints/4 does not match .*corrupt"


@case
def malformed_jsonl(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "demos.jsonl", [GOOD_DEMO, GOOD_DEMO, '{"prompt": "Repeat: a", "completion": '])
    return env.sft_args(tmp / "sft", demos=path), rf"{path}:3: malformed JSON"


@case
def json_line_not_an_object(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "demos.jsonl", [GOOD_DEMO, '["Repeat: a", " a"]'])
    return env.sft_args(tmp / "sft", demos=path), rf"{path}:2: expected a JSON object, got list"


@case
def missing_field(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "demos.jsonl", [GOOD_DEMO, {"prompt": "Repeat: a\nAnswer:", "response": " a"}])
    return env.sft_args(tmp / "sft", demos=path), rf"{path}:2: missing field 'completion'"


@case
def empty_prompt(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "demos.jsonl", [GOOD_DEMO, GOOD_DEMO, {"prompt": "  ", "completion": " a"}])
    return env.sft_args(tmp / "sft", demos=path), rf"{path}:3: field 'prompt' is empty"


@case
def empty_response(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "demos.jsonl", [{"prompt": "Repeat: a\nAnswer:", "completion": ""}, GOOD_DEMO])
    return env.sft_args(tmp / "sft", demos=path), rf"{path}:1: field 'completion' is empty"


@case
def field_of_the_wrong_type(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "demos.jsonl", [GOOD_DEMO, {"prompt": "Repeat: a\nAnswer:", "completion": 7}])
    return env.sft_args(tmp / "sft", demos=path), rf"{path}:2: field 'completion' must be a string, got int"


@case
def non_utf8_bytes(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "demos.jsonl", [GOOD_DEMO, GOOD_DEMO, GOOD_DEMO,
                                             b'{"prompt": "Repeat: \xff\xfe", "completion": " a"}'])
    return env.sft_args(tmp / "sft", demos=path), rf"{path}:4: not valid UTF-8"


@case
def empty_dataset(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "demos.jsonl", ["", "   "])
    return env.sft_args(tmp / "sft", demos=path), rf"{path}:1: empty file"


@case
def missing_data_file(env, tmp, copy, monkeypatch):
    return env.sft_args(tmp / "sft", demos=str(tmp / "nope.jsonl")), \
        rf"data\.demonstrations\.path='{tmp}/nope\.jsonl': no such file"


@case
def demonstration_longer_than_the_context(env, tmp, copy, monkeypatch):
    # overlong='error' rejects (the default 'truncate' cuts the response and warns with counts).
    long = {"prompt": "Repeat: " + " ".join(["cat dog"] * 60) + "\nAnswer:", "completion": " cat"}
    path = write_lines(tmp / "demos.jsonl", [GOOD_DEMO] * 20 + [long] + [GOOD_DEMO] * 20)
    return env.sft_args(tmp / "sft", "--config.data.demonstrations.overlong=error", demos=path), \
        rf"{path}:21: demonstration is \d+ tokens, longer than seq_len \+ 1 = \d+"


@case
def comparison_with_fewer_than_two_responses(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "cmp.jsonl", [GOOD_COMPARISON, {"prompt": "Repeat: a\nAnswer:", "responses": [" a"]}])
    return env.rm_args(tmp / "rm", path), rf"{path}:2: a comparison needs K >= 2 responses, got 1"


@case
def all_tie_ranking(env, tmp, copy, monkeypatch):
    path = write_lines(tmp / "cmp.jsonl", [GOOD_COMPARISON, {"prompt": "Repeat: a\nAnswer:", "responses": [" a", " a"]}])
    return env.rm_args(tmp / "rm", path), rf"{path}:2: responses 1 and 2 are identical"


@case
def tie_in_chosen_and_rejected(env, tmp, copy, monkeypatch):
    tie = {"prompt": "Repeat: b\nAnswer:", "chosen": " b", "rejected": " b"}
    path = write_lines(tmp / "cmp.jsonl", [GOOD_COMPARISON, GOOD_COMPARISON, tie])
    return env.rm_args(tmp / "rm", path), rf"{path}:3: responses 1 and 2 are identical"


@case
def more_responses_than_max_responses(env, tmp, copy, monkeypatch):
    many = {"prompt": "Repeat: a b\nAnswer:", "responses": [" a b", " a", " b", " b a", " a a"]}
    path = write_lines(tmp / "cmp.jsonl", [GOOD_COMPARISON] * 30 + [many] + [GOOD_COMPARISON] * 9)
    return env.rm_args(tmp / "rm", path), rf"{path}:31: 5 responses, more than rm\.max_responses=4"


@case
def ended_flags_of_the_wrong_length(env, tmp, copy, monkeypatch):
    bad = {**GOOD_COMPARISON, "ended": [True]}
    path = write_lines(tmp / "cmp.jsonl", [GOOD_COMPARISON] * 30 + [bad] + [GOOD_COMPARISON] * 9)
    return env.rm_args(tmp / "rm", path), rf"{path}:31: field 'ended' must be a list of 3 booleans"


@case
def no_comparison_fits_the_context(env, tmp, copy, monkeypatch):
    long = " " + " ".join(["cat dog"] * 60)
    record = {"prompt": "Repeat: a\nAnswer:", "responses": [long + " a", long + " b"]}
    path = write_lines(tmp / "cmp.jsonl", [record] * 40)
    return env.rm_args(tmp / "rm", path), rf"{path}: no train comparisons with >= 2 responses fit in seq_len=\d+"


@case
def nan_in_loss(env, tmp, copy, monkeypatch):
    real_loss = steps.pretrain_loss

    def nan_loss(model):
        loss_fn = real_loss(model)
        return lambda *args: (lambda loss, metrics: (loss * jnp.nan, metrics))(*loss_fn(*args))

    monkeypatch.setattr(steps, "pretrain_loss", nan_loss)
    return env.pretrain_args(copy, "--config.train.steps=6", "--config.optim.nonfinite=stop"), \
        r"non-finite loss or gradient between steps 4 and 6 .*no checkpoint after step 4 was written"


@case
def disk_full_while_saving(env, tmp, copy, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def no_space(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
    return env.pretrain_args(copy, "--config.train.steps=6"), \
        rf"saving checkpoint {copy}/checkpoints/6 failed \(No space left on device\); {copy}/checkpoints/4 is still the latest"


def finished_steps(workdir):
    return sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clean_line_and_leaves_checkpoints_alone(env, tmp_path, monkeypatch, name):
    fixture_before = tree_digest(os.path.join(env.pretrain, "checkpoints"))
    copy = env.copy_pretrain(tmp_path / "copy")
    args, expected = CASES[name](env, tmp_path, copy, monkeypatch)
    copy_steps = finished_steps(copy)
    copy_before = {s: tree_digest(os.path.join(copy, "checkpoints", s)) for s in copy_steps}
    code, err = call_main(args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert re.search(expected, errors[0]), errors[0]
    assert tree_digest(os.path.join(env.pretrain, "checkpoints")) == fixture_before
    assert finished_steps(copy) == copy_steps  # no new step (a non-finite or half-written one) appeared
    assert {s: tree_digest(os.path.join(copy, "checkpoints", s)) for s in copy_steps} == copy_before
    if name == "disk_full_while_saving":  # space again: the same command resumes from the intact step 4
        monkeypatch.undo()
        out = io.StringIO()
        code, err = call_main(args, out)
        assert code == 0 and f"resuming from {copy}/checkpoints/4" in out.getvalue(), err[-3000:]
        assert finished_steps(copy) == ["2", "4", "6"] and not any("tmp" in d for d in os.listdir(f"{copy}/checkpoints"))


def test_failed_resume_keeps_the_config_of_the_run_that_wrote_the_checkpoints(env, tmp_path):
    copy = env.copy_pretrain(tmp_path / "copy")
    config, previous = os.path.join(copy, "config.json"), os.path.join(copy, "config.previous.json")
    with open(config, "rb") as f:
        written = f.read()
    code, err = call_main(env.pretrain_args(copy, "--config.model.n_layers=3", "--config.model.d_model=96"))
    assert code == 2 and "model.d_model: 64 -> 96; model.n_layers: 2 -> 3" in err, err[-3000:]
    with open(config, "rb") as f:
        assert f.read() == written  # the new config never ran: config.json still describes the checkpoints
    assert not os.path.exists(previous)
    # A resume that works under a changed key writes the new config and keeps the earlier one beside it.
    code, err = call_main(env.pretrain_args(copy, "--config.train.steps=6"))
    assert code == 0, err[-3000:]
    with open(previous, "rb") as f:
        assert f.read() == written
    with open(config) as f:
        assert json.load(f)["train"]["steps"] == 6


def test_a_rerun_under_an_unchanged_config_blames_no_key(tmp_path):
    a, b = ml_collections.ConfigDict({"train": {"steps": 4}}), ml_collections.ConfigDict({"train": {"steps": 6}})
    workdir = common.prepare_workdir(a, str(tmp_path))
    common.prepare_workdir(b, workdir)
    assert "train.steps: 4 -> 6" in common.restore_mismatch_hint(workdir)  # and a's config.json is back
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 4
    common.prepare_workdir(b, workdir)  # b again: a is kept aside, b's run wrote the checkpoints
    common.prepare_workdir(b, workdir)
    assert common.restore_mismatch_hint(workdir) == ""
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 6


def test_catalogue_is_complete():
    assert len(CASES) >= 25


# ---------------------------------------------------------------------------------------------------
# Through a real subprocess: the CLI's own output and exit status.

def cli(args):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "instructgpt_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("which", ["unknown_key", "malformed_jsonl"])
def test_cli_prints_one_line_and_exits_2(env, tmp_path, which):
    before = tree_digest(os.path.join(env.pretrain, "checkpoints"))
    if which == "unknown_key":
        args, expected = env.pretrain_args(env.pretrain, "--config.optim.lrr=1.0"), "unknown config key 'config.optim.lrr'"
    else:
        path = write_lines(tmp_path / "demos.jsonl", [GOOD_DEMO, "{oops"])
        args, expected = env.sft_args(tmp_path / "sft", demos=path), f"{path}:2: malformed JSON"
    out = cli(args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, out.stderr[-3000:]
    assert tree_digest(os.path.join(env.pretrain, "checkpoints")) == before


def test_unexpected_exceptions_keep_their_traceback(env, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(steps, "build_model", bug)
    with pytest.raises(ZeroDivisionError):
        call_main(env.pretrain_args(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------
# What is recovered from rather than reported.

def run_ok(args) -> str:
    out = io.StringIO()
    code, err = call_main(args, out)
    assert code == 0, err[-3000:]
    return out.getvalue()


def test_resume_ignores_a_half_written_checkpoint(env, tmp_path):
    """A run killed inside an orbax save leaves `<step>.orbax-checkpoint-tmp`: the previous step is used."""
    copy = env.copy_pretrain(tmp_path / "copy")
    partial = os.path.join(copy, "checkpoints", "6.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "half_written"), "wb") as f:
        f.write(b"\x00" * 100)
    out = run_ok(env.pretrain_args(copy, "--config.train.steps=6"))
    assert f"resuming from {copy}/checkpoints/4" in out
    assert finished_steps(copy) == ["2", "4", "6"] and not os.path.exists(partial)


def test_resume_moves_an_unreadable_latest_checkpoint_aside(env, tmp_path):
    """A finished step whose files are garbled (a disk that lost data): resume from the step before,
    keep the bad one as `<step>.corrupt` for inspection, and say so."""
    copy = env.copy_pretrain(tmp_path / "copy")
    for root, _, files in os.walk(os.path.join(copy, "checkpoints", "4", "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    out = run_ok(env.pretrain_args(copy, "--config.train.steps=6"))
    assert f"checkpoint {copy}/checkpoints/4 is unreadable; moved it to {copy}/checkpoints/4.corrupt" in out
    assert f"resuming from {copy}/checkpoints/2" in out
    assert finished_steps(copy) == ["2", "4", "6"] and os.path.isdir(f"{copy}/checkpoints/4.corrupt")


def read_params(workdir, step):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    return state["params"]


def test_nonfinite_updates_are_skipped_and_counted(env, tmp_path, monkeypatch):
    """optim.nonfinite='skip' (the default): a NaN loss leaves params unchanged; every skip is counted."""
    real_loss = steps.pretrain_loss

    def nan_loss(model):
        loss_fn = real_loss(model)
        return lambda *args: (lambda loss, metrics: (loss * jnp.nan, metrics))(*loss_fn(*args))

    monkeypatch.setattr(steps, "pretrain_loss", nan_loss)
    copy = env.copy_pretrain(tmp_path / "copy")
    run_ok(env.pretrain_args(copy, "--config.train.steps=7", "--config.train.log_every=2"))
    records = [json.loads(line) for line in open(os.path.join(copy, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train" and r["step"] > 4]
    assert [(r["step"], r["nonfinite_total"]) for r in train] == [(6, 2.0), (7, 3.0)]  # step 5 counted though not logged
    before, after = read_params(copy, 4), read_params(copy, 7)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_nonfinite_state_is_never_checkpointed(tmp_path):
    """Whatever produced it (a step that does not guard its update), NaN params stop the run before a save."""
    import ml_collections

    from instructgpt_jax.train import loop
    from instructgpt_jax.train.checkpoint import Checkpointer
    from instructgpt_jax.train.metrics import MetricWriter

    config = ml_collections.ConfigDict(dict(stage="test", optim=dict(nonfinite="skip"), train=dict(
        steps=4, log_every=1, eval_every=100, checkpoint_every=2, progress_bar=False)))
    ck = Checkpointer(str(tmp_path), async_save=False)

    def step(state, batch):
        w = state["w"] + 1.0
        return {"w": jnp.where(w > 2.5, jnp.nan, w)}, {"loss": jnp.float32(1.0), "nonfinite": jnp.float32(0.0)}

    with pytest.raises(loop.NonFiniteError, match=r"NaN/Inf values at step 4; it was not checkpointed"):
        loop.train_loop(config=config, state={"w": jnp.zeros(3)}, train_step=step, batches=iter(range(10)),
                        to_device=lambda b: b, checkpointer=ck, writer=MetricWriter(str(tmp_path), "test", None))
    assert list(ck.manager.all_steps()) == [2]
    ck.close()


def test_config_values_of_the_wrong_type_name_the_key():
    from instructgpt_jax import configs
    from instructgpt_jax.errors import ConfigError

    c = experiment_config_for_types()
    with pytest.raises(ConfigError, match=r"train\.steps='20': expected int, got str"):
        configs.validate(c)


def experiment_config_for_types():
    import ml_collections

    from test_sft import experiment_config

    c = experiment_config("pretrain")
    train = c.train.to_dict()
    train["steps"] = "20"  # as a hand-written experiment file might
    c.train = ml_collections.ConfigDict(train)
    return c


# ---------------------------------------------------------------------------------------------------
# Nothing unpickles or execs a data, tokenizer or weight file.

UNSAFE = re.compile(r"\b(pickle|cPickle|dill|cloudpickle|joblib|marshal|shelve)\.(load|loads|Unpickler)\b"
                    r"|allow_pickle\s*=\s*True|\btorch\.load\b|\byaml\.(load|unsafe_load)\(|(?<![\w.])(eval|exec)\("
                    r"|\.exec_module\(|\bimportlib\.machinery\.SourceFileLoader\b|\brunpy\.")
# Experiment configs are Python by design: loading one (configs.load_config_module) is the only allowed exec.
ALLOWED = {("instructgpt_jax/configs.py", "spec.loader.exec_module(module)")}


def test_no_source_file_unpickles_or_execs_data():
    found = []
    for root, _, files in os.walk(os.path.join(REPO, "instructgpt_jax")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, REPO)
            for number, line in enumerate(open(path, encoding="utf-8"), start=1):
                code = line.split("#", 1)[0]
                if UNSAFE.search(code) and (rel, code.strip()) not in ALLOWED:
                    found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "unpickling / exec of possibly untrusted input:\n" + "\n".join(found)
    assert UNSAFE.search("np.load(path, allow_pickle=True)") and UNSAFE.search("x = pickle.loads(b)")
    assert UNSAFE.search("eval(text)") and not UNSAFE.search("jax.ensure_compile_time_eval()")
