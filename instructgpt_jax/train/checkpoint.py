"""Orbax checkpoints: the train state, the data-iterator position and metadata, with auto-resume.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous step as
the latest. Later stages load only `params` from an earlier stage's workdir (`load_params`).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from instructgpt_jax.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class Checkpointer:
    """A thin CheckpointManager wrapper: keep-N, async saves, state + JSON data-iterator state."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        items["data"] = ocp.args.JsonSave(data_state or {})
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into abstract_state's shapes and shardings; names the directory on mismatch."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match this config's model/optimizer "
                f"(or is corrupt): {str(e).splitlines()[0][:300]}") from e
        return restored.state, dict(restored.data or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(workdir: str, abstract_params: Any, key: str = "params") -> Any:
    """The `params` (or `ema_params`) of the latest checkpoint in another stage's workdir."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory {directory} (has the earlier stage run?)")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"no finished checkpoint in {directory}")
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
                                abstract_params)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={key: abstract_params}, restore_args={key: restore_args}, partial_restore=True)))
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        raise CheckpointError(
            f"cannot load {key} from {directory}/{step}: model shapes differ or the checkpoint is corrupt: "
            f"{str(e).splitlines()[0][:300]}") from e
    finally:
        manager.close()
    return restored.state[key]
