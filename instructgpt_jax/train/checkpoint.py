"""Orbax checkpoints: the train state, the data-iterator position and metadata, with auto-resume.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step into `<step>.orbax-checkpoint-tmp`
and renames it when complete, so a run killed mid-save leaves the previous step as the latest; the
leftover temporary directory is ignored and removed when the workdir is next opened. A finished step
that cannot be read (truncated or garbled files) is moved aside to `<step>.corrupt` with a warning
and the run resumes from the step before it; when no step can be read the error names the directory.
A failed save (disk full) raises CheckpointError and leaves the previous checkpoint as the latest.
Later stages load only `params` from an earlier stage's workdir (`load_params`), which never falls
back: a corrupt checkpoint there is an error naming it.
"""
from __future__ import annotations

import logging as pylogging
import os
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from instructgpt_jax.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_SUFFIX = ".corrupt"
# What orbax/tensorstore raise for a checkpoint that does not match the abstract state or cannot be read.
RESTORE_ERRORS = (ValueError, KeyError, FileNotFoundError, TypeError, OSError, IndexError, AttributeError)


READ_ONLY_NOTES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")


class _NoOrbaxTracebacks(pylogging.Filter):
    """Orbax logs the traceback of a failed background save before we raise a CheckpointError for it:
    keep its one-line message, drop the traceback (the CheckpointError carries the cause). Also drops
    its notes that a directory opened read-only is read-only."""

    def filter(self, record):
        if record.getMessage().startswith(READ_ONLY_NOTES):  # load_params opens other stages read-only on purpose
            return False
        if record.exc_info and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
            record.exc_info, record.exc_text = None, None
        return True


pylogging.getLogger("absl").addFilter(_NoOrbaxTracebacks())


def _join_orbax_threads(timeout: float = 120.0) -> None:
    """After a failed save, orbax's other writer threads of that save may still run (and write into
    its temporary directory): wait for them, so that nothing writes behind the error."""
    from orbax.checkpoint._src.futures import future

    for thread in threading.enumerate():
        if isinstance(thread, future._SignalingThread) and thread is not threading.current_thread():  # noqa: SLF001
            thread.join(timeout)


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR))


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


class Checkpointer:
    """A thin CheckpointManager wrapper: keep-N, async saves, state + JSON data-iterator state."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
                 mismatch_hint: Callable[[], str] | None = None):
        """mismatch_hint: called when no checkpoint restores; its text is appended to the error (the
        stages name the config keys changed since the run that wrote the checkpoints)."""
        self.directory = checkpoint_dir(workdir)
        self.mismatch_hint = mismatch_hint
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        except OSError as e:
            raise CheckpointError(f"cannot open the checkpoint directory {self.directory}: {first_line(e)}") from e
        self.pending: int | None = None  # step of an async save not yet known to have finished

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        """Starts saving `step` (async by default); an earlier async save that failed raises here."""
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state or {})}
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except OSError as e:
            self._failed(self.pending if self.pending is not None else step, e)
        self.pending = step

    def _failed(self, step: int, e: BaseException) -> None:
        """Quiesces orbax's background threads, then raises a CheckpointError naming the step."""
        self.abandon()
        self.manager.reload()
        latest = self.manager.latest_step()
        previous = f"{self.directory}/{latest} is still the latest checkpoint" if latest is not None \
            else f"no earlier checkpoint in {self.directory}"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise CheckpointError(f"saving checkpoint {self.directory}/{step} failed ({reason}); {previous}. "
                              "Free space (or fix the directory) and rerun the same command to resume") from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into abstract_state's shapes and shardings; names the directory on mismatch."""
        try:
            return self._restore(abstract_state, step)
        except CheckpointError as e:
            raise self._hinted(e) from e.__cause__

    def _hinted(self, error: CheckpointError) -> CheckpointError:
        hint = self.mismatch_hint() if self.mismatch_hint else ""
        return CheckpointError(f"{error}{hint}") if hint else error

    def _restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except RESTORE_ERRORS as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this config's model/optimizer "
                f"(or is corrupt): {first_line(e)}") from e
        return restored.state, dict(restored.data or {})

    def restore_latest(self, abstract_state: Any, log=print) -> tuple[Any, dict, int] | None:
        """(state, data_state, step) of the newest readable step, or None when there is no checkpoint.

        When the newest step is unreadable but an older one restores, the newest is moved aside to
        `<step>.corrupt` (kept for inspection) with a warning; when none restores, the newest step's
        error is raised (a different model shape, typically) and nothing is moved."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        first_error = None
        for step in steps:
            try:
                state, data_state = self._restore(abstract_state, step)
            except CheckpointError as e:
                first_error = first_error or e
                continue
            unreadable = [s for s in steps if s > step]
            for bad in unreadable:
                self._move_aside(bad, log)
            if unreadable:
                self.manager.reload()
            return state, data_state, step
        raise self._hinted(first_error) from first_error.__cause__

    def _move_aside(self, step: int, log) -> None:
        path = os.path.join(self.directory, str(step))
        target = path + CORRUPT_SUFFIX
        n = 1
        while os.path.exists(target):
            n, target = n + 1, f"{path}{CORRUPT_SUFFIX}{n}"
        if jax.process_index() == 0:
            os.replace(path, target)
        message = f"warning: checkpoint {path} is unreadable; moved it to {target} and resuming from the step before"
        logging.warning(message)
        log(message)

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            self._failed(self.pending, e)
        self.pending = None

    def abandon(self) -> None:
        """On an error elsewhere: waits for a save in flight, ignoring its own failure, so that orbax's
        background threads end before the process does (the error being raised is what matters)."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001
            pass
        _join_orbax_threads()
        self.pending = None

    def close(self) -> None:
        self.wait()
        self.manager.close()


def load_params(workdir: str, abstract_params: Any, key: str = "params", subtree: str = "") -> Any:
    """The `params` (or `ema_params`) of the latest checkpoint in another stage's workdir; with `subtree`,
    only that part of them (a PPO checkpoint's "policy" beside its "value")."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory {directory} (has the earlier stage run?)")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    step = manager.latest_step()
    if step is None:
        manager.close()
        raise CheckpointError(f"no finished checkpoint in {directory} (has the earlier stage run?)")
    try:
        mismatch = _shape_mismatch(os.path.join(directory, str(step), "state"), abstract_params, key, subtree)
    except RESTORE_ERRORS as e:
        manager.close()
        raise CheckpointError(f"cannot load {key} from {directory}/{step}: the checkpoint is corrupt: {first_line(e)}") from e
    if mismatch:
        manager.close()
        raise CheckpointError(f"cannot load {key} from {directory}/{step}: model shapes differ from this config's: {mismatch}")
    wanted = {subtree: abstract_params} if subtree else abstract_params
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
                                wanted)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={key: wanted}, restore_args={key: restore_args}, partial_restore=True)))
    except RESTORE_ERRORS as e:
        raise CheckpointError(
            f"cannot load {key} from {directory}/{step}: model shapes differ or the checkpoint is corrupt: "
            f"{first_line(e)}") from e
    finally:
        manager.close()
    return restored.state[key][subtree] if subtree else restored.state[key]


def _shape_mismatch(state_dir: str, abstract_params: Any, key: str, subtree: str = "") -> str:
    """'' when the checkpoint's `key` (`key`/`subtree`) has exactly abstract_params' paths and shapes, else
    what differs."""
    # The handler reads the item's tree metadata; a Checkpointer would also look for the step-level metadata file,
    # which a CheckpointManager writes one directory up, and log a warning on every load.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(epath.Path(state_dir))
    finally:
        handler.close()
    tree = getattr(metadata, "tree", metadata)
    if key not in tree:
        return f"the checkpoint has no {key!r} (it has {sorted(tree)})"
    if subtree and subtree not in tree[key]:
        return f"the checkpoint's {key!r} has no {subtree!r} (it has {sorted(tree[key])})"
    tree = {key: tree[key][subtree]} if subtree else tree
    flat = lambda t: {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    saved, wanted = flat(tree[key]), flat(abstract_params)
    problems = []
    if missing := sorted(set(wanted) - set(saved)):
        problems.append(f"{len(missing)} parameters missing there, e.g. {missing[0]}")
    if extra := sorted(set(saved) - set(wanted)):
        problems.append(f"{len(extra)} parameters not in this model, e.g. {extra[0]}")
    if differ := sorted(p for p in set(saved) & set(wanted) if saved[p] != wanted[p]):
        problems.append(f"{differ[0]} is {saved[differ[0]]} there but {wanted[differ[0]]} here"
                        + (f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""))
    return "; ".join(problems)
