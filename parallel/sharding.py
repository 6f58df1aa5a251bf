"""Sharding as data: logical axis names, one rules table, NamedShardings.

Every parameter and activation carries logical axis names (``batch``, ``seq``, ``embed``,
``heads``, ``kv_heads``, ``mlp``, ``vocab``, ``layers``...). A rules table, set in the
config, maps each logical name to mesh axes (``data``, ``fsdp``, ``tensor``, ``stage``,
``context``, ``expert``) or to None (replicated). Model code calls ``constrain(x, names)``
at layer boundaries; it is a no-op unless a mesh and rules are active.

From the same table this module derives the shardings of the train state (parameters,
optimizer moments like their parameters, scalars replicated) and of batches ([batch, seq]
split over the axes ``batch`` and ``seq`` map to), assembles per-process data into global
arrays, and checks rules and model sizes against the mesh before anything is compiled.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, "str | Sequence[str] | None"]]

# Logical axis names that models use; ``validate_rules`` refuses others on the left of a rule.
LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "norm",
                "experts", "state", "inner")

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("loom_sharding", default=None)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for one array's logical axis names; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = tuple(a for a in _targets(target) if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context (and while tracing under it) ``constrain`` shards activations."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active():
    """The active (mesh, rules), or None. Jitted functions that call ``constrain`` and are cached
    across contexts take it as a static argument, so each layout gets its own compilation."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; identity when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


# ----------------------------------------------------------------------------- rules and checks

def _targets(target) -> tuple[str, ...]:
    """A rule's right-hand side (None, one mesh axis, or several) as a tuple of mesh axes."""
    return (target,) if isinstance(target, str) else tuple(target or ())


def _axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _describe(mesh: Mesh, axes: Sequence[str]) -> str:
    """'the tensor axis (4)' or 'the data x fsdp axes (2 x 2 = 4)'; axes of size 1 are left out."""
    axes = [a for a in axes if mesh.shape[a] > 1] or list(axes)
    if len(axes) == 1:
        return f"the {axes[0]} axis ({mesh.shape[axes[0]]})"
    sizes = " x ".join(str(mesh.shape[a]) for a in axes)
    return f"the {' x '.join(axes)} axes ({sizes} = {_axes_size(mesh, axes)})"


def validate_rules(rules: Rules, mesh: Mesh, known: Sequence[str] = LOGICAL_AXES) -> None:
    """Raise ValueError (one sentence naming the entry and the fix) for a malformed rules table.

    Each entry is (logical axis from ``known``, None | mesh axis | tuple of mesh axes); a
    logical axis appears once and a mesh axis at most once per entry.
    """
    seen: set[str] = set()
    for entry in rules:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"sharding rule {entry!r} is not a (logical axis, mesh axes) pair; write it like "
                             f"('heads', 'tensor').")
        name, target = entry
        if name not in known:
            raise ValueError(f"sharding rule ({name!r}, {target!r}) names an unknown logical axis {name!r}; "
                             f"use one of {list(known)}.")
        if name in seen:
            raise ValueError(f"sharding rules map {name!r} more than once; keep a single entry for it.")
        seen.add(name)
        ok = target is None or isinstance(target, str) or (
            isinstance(target, (tuple, list)) and all(isinstance(a, str) for a in target))
        axes = _targets(target) if ok else ()
        if not ok or len(set(axes)) != len(axes):
            raise ValueError(f"sharding rule ({name!r}, {target!r}) must map to None, a mesh axis or a tuple of "
                             f"distinct mesh axes.")
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(f"sharding rule ({name!r}, {target!r}) uses {axis!r}, which is not a mesh axis; "
                                 f"use axes from {list(mesh.axis_names)} or None.")


# Logical axis -> the model config field that counts it (for ``heads`` the merged heads*head_dim
# dimension of wq/wo is split, so whole heads must divide evenly).
_COUNTED_BY = (("heads", "n_heads"), ("kv_heads", "n_kv_heads"), ("head_dim", "head_dim"), ("mlp", "d_ff"),
               ("vocab", "vocab_size"), ("embed", "d_model"), ("layers", "n_layers"), ("experts", "num_experts"), ("inner", "d_inner"))


def check_divisibility(mcfg: Any, mesh: Mesh, rules: Rules, global_batch_size: int, *, seq_len: int | None = None,
                       accum_steps: int = 1) -> None:
    """Raise ValueError (one sentence naming the config fields) for a size the mesh cannot split evenly.

    Model sizes (n_heads, n_kv_heads, head_dim, d_ff, vocab_size, d_model, n_layers, num_experts, d_inner
    where ``mcfg`` has them) against the mesh axes their logical axis maps to; the (micro)batch
    ``global_batch_size / accum_steps`` against the axes of ``batch``; ``seq_len`` against ``seq``.
    """
    table = dict(rules)
    for name, field in _COUNTED_BY:
        value, axes = getattr(mcfg, field, None), _targets(table.get(name))
        if value is not None and axes and value % _axes_size(mesh, axes):
            raise ValueError(f"model.{field} ({value}) is not divisible by {_describe(mesh, axes)} that {name!r} "
                             f"maps to; change model.{field}, the mesh sizes, or the {name!r} sharding rule.")
    axes = _targets(table.get("batch"))
    micro = global_batch_size // accum_steps
    if axes and (global_batch_size % accum_steps or micro % _axes_size(mesh, axes)):
        what = (f"train.batch_size ({global_batch_size})" if accum_steps == 1 else
                f"train.batch_size / optim.accum_steps ({global_batch_size} / {accum_steps})")
        raise ValueError(f"{what} is not divisible by {_describe(mesh, axes)} that 'batch' maps to; make "
                         f"the batch a multiple of {_axes_size(mesh, axes)} or change the mesh.")
    axes = _targets(table.get("seq"))
    if seq_len is not None and axes and seq_len % _axes_size(mesh, axes):
        raise ValueError(f"train.seq_len ({seq_len}) is not divisible by {_describe(mesh, axes)} that 'seq' "
                         f"maps to; change train.seq_len or the mesh.")


# ----------------------------------------------------------------------------- shardings

def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def tree_shardings(axes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A NamedSharding per leaf of ``axes_tree``, whose leaves are tuples of logical names (one per dim)."""
    return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, rules)), axes_tree,
                        is_leaf=_is_names)


def state_shardings(state_shape: Any, param_axes: Any, mesh: Mesh, rules: Rules,
                    tx: optax.GradientTransformation) -> Any:
    """Shardings for a train state (a dataclass with ``params`` and ``opt_state``; e.g. from ``jax.eval_shape``).

    ``params`` follow ``param_axes``; every optimizer-state tree that mirrors the parameters
    (Adam's mu and nu) follows the same shardings leaf by leaf (where shapes agree); every
    other leaf (counts, ``step``, anything else) is replicated. Returns the same dataclass
    type with NamedSharding leaves, ready for ``jit``'s in/out_shardings.
    """
    params = state_shape.params
    if jax.tree.structure(params) != jax.tree.structure(param_axes, is_leaf=_is_names):
        raise ValueError("param_axes does not have the structure of the parameters; make the model's "
                         "param_axes return one name tuple per parameter.")

    def check_rank(path, leaf, names):
        if len(names) != leaf.ndim:
            raise ValueError(f"param_axes{jax.tree_util.keystr(path)} is {names} but the parameter has shape "
                             f"{tuple(leaf.shape)}; give one logical name per dimension.")

    jax.tree_util.tree_map_with_path(check_rank, params, param_axes)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = tree_shardings(param_axes, mesh, rules)
    opt_sh = optax.tree_map_params(
        tx, lambda leaf, sh, p: sh if tuple(leaf.shape) == tuple(p.shape) else replicated,
        state_shape.opt_state, param_sh, params, transform_non_params=lambda _: replicated)
    fields = {f.name: jax.tree.map(lambda _: replicated, getattr(state_shape, f.name))
              for f in dataclasses.fields(state_shape)}
    return dataclasses.replace(state_shape, **{**fields, "params": param_sh, "opt_state": opt_sh})


def _batch_spec(ndim: int, rules: Rules) -> PartitionSpec:
    """Arrays of a batch are [batch, seq, ...]: dim 0 is ``batch``, dim 1 ``seq``, the rest replicated."""
    return logical_to_spec((("batch", "seq") + (None,) * ndim)[:ndim], rules)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """The sharding of a [batch, seq] array (tokens, targets, masks...)."""
    return NamedSharding(mesh, _batch_spec(2, rules))


def process_batch_rows(mesh: Mesh, rules: Rules, global_batch_size: int) -> slice:
    """The rows of a [global_batch_size, ...] batch that this process's devices hold (what it must load).

    Rows are contiguous per process when ``batch`` maps to outer mesh axes (``data`` is the
    outermost); the whole batch when ``batch`` does not cross processes.
    """
    sharding = NamedSharding(mesh, _batch_spec(1, rules))
    rows = {idx[0].indices(global_batch_size)[:2]
            for idx in sharding.addressable_devices_indices_map((global_batch_size,)).values()}
    lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
    if sum(b - a for a, b in rows) != hi - lo:
        raise ValueError(f"this process's batch rows {sorted(rows)} are not contiguous; map 'batch' to outer mesh "
                         f"axes (e.g. data) so that each process holds one block of rows.")
    return slice(lo, hi)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Assemble each process's part of the batch into global ``jax.Array``s sharded like ``batch_sharding``.

    local_batch: name -> [local_batch, seq, ...] array holding this process's rows
    (``process_batch_rows``; all rows in a single process). Returns name -> [global_batch, seq, ...].
    """
    return {k: jax.make_array_from_process_local_data(NamedSharding(mesh, _batch_spec(np.ndim(v), rules)),
                                                      np.asarray(v))
            for k, v in local_batch.items()}


def batch_multiple() -> int:
    """Rows per batch must be a multiple of the mesh axes that ``batch`` maps to in the active
    layout (1 without one)."""
    layout = active()
    if layout is None:
        return 1
    mesh, rules = layout
    return _axes_size(mesh, _targets(logical_to_spec(("batch",), rules)[0]))
