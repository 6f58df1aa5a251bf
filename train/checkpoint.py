"""Checkpoints through Orbax: train state plus the data iterator position, with checksums.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed during a save leaves the previous checkpoints intact and the partial one is never
read. Each checkpoint also holds a ``meta`` item (JSON): a checksum of every array of the
state, a checksum of the data iterator's state, the config that wrote it and the count of
skipped non-finite steps, and, once Orbax has written every file (in its temporary directory, before
the rename that commits it), ``files.sha256.json``: the SHA-256 of every file of the checkpoint's
items, computed on process 0 on Orbax's background thread (asynchronous saves; after a synchronous
save, on the committed directory). The array checksums are computed on device, from the very arrays
handed to Orbax, by a jitted integer reduction over each global array (sums of mixed 32-bit
words modulo 2**32, so the result does not depend on sharding or reduction order and every
process gets the same value); Orbax writes the item from the primary process. A restore
recomputes them from the arrays read back and compares: a checkpoint that cannot be restored
or does not match its checksums raises CheckpointError naming the step and is left on disk
untouched; the run then stops instead of writing over it. A state with a non-finite value is
never saved (NonFiniteError).
"""
from __future__ import annotations

import gc
import glob
import hashlib
import json
import logging as std_logging
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from parallel.sharding import path_name

FORMAT = 1
FILES = "files.sha256.json"
ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run's state (or the workdir cannot be used)."""


class NonFiniteError(ValueError):
    """A non-finite loss, gradient norm or state: the run stops without saving it."""


class _OrbaxFilter(std_logging.Filter):
    """Drops Orbax's records below ``level`` (it logs through absl's logger: about 40 INFO lines per checkpoint)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno >= self.level or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logging(level: int = std_logging.WARNING) -> None:
    """Orbax's records below ``level`` dropped (default: its INFO lines; warnings and errors still show);
    other absl logging unchanged. The first call sets the level: later calls leave it."""
    logger = std_logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxFilter) for f in logger.filters):
        logger.addFilter(_OrbaxFilter(level))


_NOISE = (("RuntimeError", "Event loop is closed"), ("ImportError", "sys.meta_path is None"))


def _drop_async_noise(previous):
    def hook(unraisable):
        e = unraisable.exc_value
        if any(type(e).__name__ == name and str(e).startswith(text) for name, text in _NOISE):
            return  # a TensorStore or Orbax callback reaching an event loop closed by a failed restore or at exit
        previous(unraisable)
    hook.drops_async_noise = True
    return hook


class _NeverRetrieved(std_logging.Filter):
    def filter(self, record):
        return "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]


def quiet_async_noise() -> None:
    """After a failure: drop the asynchronous aftermath of Orbax's event loop, closed by a failed restore while
    TensorStore reads were in flight, or left with pending writes: "Event loop is closed" / "sys.meta_path is
    None" (unraisable exceptions from TensorStore callbacks, dozens of tracebacks), asyncio's "Task/Future
    exception was never retrieved" and "coroutine ... was never awaited". Collects the loop's garbage now.
    Every other unraisable exception, log record and warning is reported as before."""
    if not getattr(sys.unraisablehook, "drops_async_noise", False):
        sys.unraisablehook = _drop_async_noise(sys.unraisablehook)
    logger = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _NeverRetrieved) for f in logger.filters):
        logger.addFilter(_NeverRetrieved())
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    gc.collect()


_C1, _C2, _C3 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77), np.uint32(0x27D4EB2F)
_WORD = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _fmix(h):
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _digest(x):
    """(uint32[2] checksum, bool finite) of one array: two sums of mixed (word, flat index) pairs."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = jax.lax.bitcast_convert_type(x, _WORD[x.dtype.itemsize]).astype(jnp.uint32)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for d in reversed(range(x.ndim)):  # the row-major flat index, without reshaping a sharded array
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(stride % 2 ** 32)
        stride *= x.shape[d]
    a = jnp.sum(_fmix(words + index * _C1), dtype=jnp.uint32)
    b = jnp.sum(_fmix(words ^ (index * _C2 + _C3)), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
    return jnp.stack([a, b]), finite


_digests = jax.jit(lambda tree: (jax.tree.map(lambda x: _digest(x)[0], tree),
                                 jax.tree.map(lambda x: _digest(x)[1], tree)))


def array_checksums(tree) -> tuple[dict[str, str], list[str]]:
    """({path: 16 hex digits} of every array of ``tree``, [paths holding a non-finite value])."""
    digests, finites = jax.device_get(_digests(tree))
    sums, bad = {}, []
    for (path, digest), finite in zip(jax.tree_util.tree_flatten_with_path(digests)[0], jax.tree.leaves(finites)):
        name = path_name(path)
        sums[name] = "%08x%08x" % tuple(int(v) for v in np.asarray(digest))
        if not bool(finite):
            bad.append(name)
    return sums, bad


def data_checksum(data_state) -> str:
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else repr(e)


class Checkpointer:
    """Saves every ``every`` steps (asynchronously), keeps the last ``keep``, restores the latest."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.every = every
        self.record = {}  # written into each checkpoint's meta item
        self.meta = None  # the latest restored checkpoint's meta item (None: none, or written before checksums)
        self._closed = False
        self._async = async_save
        self._saving = None  # the step whose asynchronous save is under way
        async_options = ocp.AsyncOptions(post_finalization_callback=self._seal_saving) if async_save else None
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=False, read_only=read_only, async_options=async_options),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_state: dict, *, wait: bool = False) -> None:
        """Start saving ``state`` and the data iterator's ``data_state`` (JSON-able) at ``step`` with their
        checksums and ``self.record`` (JSON-able: the trainer's config, the skipped-step count) in the meta
        item. NonFiniteError (nothing written) when the state holds a non-finite value."""
        if step in self._manager.all_steps():
            return
        sums, bad = array_checksums(state)
        if bad:
            raise NonFiniteError(f"the train state at step {step} holds non-finite values ({', '.join(bad[:3])}"
                                 f"{', ...' if len(bad) > 3 else ''}); it was not saved.")
        meta = {**self.record, "format": FORMAT, "step": int(step), "arrays": sums,
                "data": data_checksum(data_state)}
        self._manager.wait_until_finished()  # the previous save's callback has run (Orbax waits here anyway)
        self._saving = step
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=True)
        if not self._async:
            _seal(os.path.join(self.directory, str(step)))
        if wait:
            self.wait()

    def _seal_saving(self) -> None:
        """Orbax's post-finalization callback: every file of the step being saved is written, in its temporary
        directory, not yet renamed."""
        tmp = sorted(glob.glob(os.path.join(self.directory, f"{self._saving}.orbax-checkpoint-tmp*")))
        _seal(tmp[-1] if tmp else os.path.join(self.directory, str(self._saving)))

    def restore(self, abstract_state):
        """(state, data_state, step) from the latest checkpoint, or None when there is none; its meta item
        (checksums, config) in ``self.meta``.

        ``abstract_state``: the state's pytree of ``jax.ShapeDtypeStruct`` with shardings.
        Raises CheckpointError naming the step when the checkpoint does not match or fails its checksums.
        """
        step = self.latest_step()
        if step is None:
            return None
        path = os.path.join(self.directory, str(step))
        _verify_files(path, step)
        has_meta = os.path.isdir(os.path.join(path, "meta"))
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        if has_meta:
            items["meta"] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises several types for missing, corrupt or mismatched files.
            quiet_async_noise()
            raise CheckpointError(
                f"checkpoint {path} (step {step}) cannot be restored into this run's state ({type(e).__name__}: "
                f"{_first_line(e)}): it is damaged or was written with another model "
                f"structure, optim.name or optim.frozen, and was left untouched. Use another --workdir, or move "
                f"the checkpoint away if it is not needed.") from e
        _check_shapes(restored.state, abstract_state, path)
        if has_meta:
            _verify(restored.state, restored.data, restored.meta, path, step)
            self.meta = restored.meta
        else:
            logging.warning("checkpoint %s has no checksums (written before they were added); not verified.", path)
        return restored.state, restored.data, step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and close the manager (its threads and event loop), also when waiting fails."""
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()


_MOVED = ("; it is corrupt and was left untouched. Move it away to resume from an earlier checkpoint, or use "
          "another --workdir.")


def _item_files(path: str) -> list[str]:
    """The files of a checkpoint directory's items, relative to it (Orbax's commit markers left out)."""
    out = []
    for item in ITEMS:
        for root, _, files in os.walk(os.path.join(path, item)):
            out += [os.path.relpath(os.path.join(root, f), path) for f in files if f != "commit_success.txt"]
    return sorted(out)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _seal(path: str) -> None:
    """Write ``path/files.sha256.json`` (process 0): the SHA-256 of every item file. A failure only leaves the
    checkpoint without file checksums (its arrays are still verified), so it is logged, not raised."""
    if jax.process_index() != 0:
        return
    try:
        sums = {name: _sha256(os.path.join(path, name)) for name in _item_files(path)}
        tmp = os.path.join(path, FILES + ".tmp")
        with open(tmp, "w") as f:
            json.dump(sums, f, indent=0, sort_keys=True)
        os.replace(tmp, os.path.join(path, FILES))
    except OSError as e:
        logging.warning("could not write the file checksums of checkpoint %s: %s", path, e)


def _verify_files(path: str, step: int) -> None:
    """CheckpointError naming the step and a file when a file of the checkpoint differs from its recorded SHA-256,
    is missing or was added. Checkpoints without ``files.sha256.json`` pass (their arrays are verified)."""
    record = os.path.join(path, FILES)
    if not os.path.exists(record):
        return
    try:
        with open(record) as f:
            sums = json.load(f)
        if not isinstance(sums, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} (step {step}) has an unreadable {FILES} ({e}){_MOVED}") from None
    names = _item_files(path)
    for name in sorted(set(names) | set(sums)):
        if name not in sums:
            problem = "was added after the save"
        elif name not in names:
            problem = "is missing"
        elif _sha256(os.path.join(path, name)) != sums[name]:
            problem = "differs from what was saved"
        else:
            continue
        raise CheckpointError(f"checkpoint {path} (step {step}) fails its checksum: the file {name} {problem}{_MOVED}")


def _verify(state, data_state, meta, path: str, step: int) -> None:
    moved = _MOVED
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), dict):
        raise CheckpointError(f"checkpoint {path} (step {step}) has an unreadable checksum record{moved}")
    sums, _ = array_checksums(state)
    differ = sorted(k for k in set(sums) | set(meta["arrays"]) if sums.get(k) != meta["arrays"].get(k))
    if differ:
        raise CheckpointError(f"checkpoint {path} (step {step}) fails its checksum: {len(differ)} array(s) "
                              f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}) differ from what was "
                              f"saved{moved}")
    if data_checksum(data_state) != meta.get("data"):
        raise CheckpointError(f"checkpoint {path} (step {step}) fails its checksum: the data iterator state differs "
                              f"from what was saved{moved}")


def _check_shapes(state, abstract_state, path: str) -> None:
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), state)
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract_state)
    if got != want:
        raise CheckpointError(f"checkpoint {path} holds arrays of other shapes than this config's model; "
                              "it was left untouched. Use the config it was written with, or another --workdir.")
