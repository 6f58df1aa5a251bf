"""Checkpoints through Orbax: train state plus the data iterator position.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed during a save leaves the previous checkpoints intact and the partial one is never
read. A checkpoint that cannot be restored is reported and left on disk untouched; the
run then stops instead of writing over it.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run's state."""


class Checkpointer:
    """Saves every ``every`` steps (asynchronously), keeps the last ``keep``, restores the latest."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=False, read_only=read_only),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_state: dict, *, wait: bool = False) -> None:
        """Start saving ``state`` and the data iterator's ``data_state`` (JSON-able) at ``step``."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
        if wait:
            self.wait()

    def restore(self, abstract_state):
        """(state, data_state, step) from the latest checkpoint, or None when there is none.

        ``abstract_state``: the state's pytree of ``jax.ShapeDtypeStruct`` with shardings.
        Raises CheckpointError naming the directory when the checkpoint does not match.
        """
        step = self.latest_step()
        if step is None:
            return None
        path = os.path.join(self.directory, str(step))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax raises several types for missing, corrupt or mismatched files.
            raise CheckpointError(
                f"checkpoint {path} cannot be restored into this run's state ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else e!r}): it is damaged or was written with another model "
                f"structure, optim.name or optim.frozen, and was left untouched. Use another --workdir, or move "
                f"the checkpoint away if it is not needed.") from e
        _check_shapes(restored.state, abstract_state, path)
        return restored.state, restored.data, step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_shapes(state, abstract_state, path: str) -> None:
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), state)
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract_state)
    if got != want:
        raise CheckpointError(f"checkpoint {path} holds arrays of other shapes than this config's model; "
                              "it was left untouched. Use the config it was written with, or another --workdir.")
