"""Sharding as data: logical axis names, one rules table, NamedShardings.

Every parameter and activation carries logical axis names (``batch``, ``seq``, ``embed``,
``heads``, ``kv_heads``, ``mlp``, ``vocab``, ``layers``...). A rules table, set in the
config, maps each logical name to mesh axes (``data``, ``fsdp``, ``tensor``, ``stage``,
``context``, ``expert``) or to None (replicated). Model code calls ``constrain(x, names)``
at layer boundaries; it is a no-op unless a mesh and rules are active.

From the same table this module derives the shardings of any tree of logical axes (the
train state: parameters, optimizer state, scalars ``()``) and of batches ([batch, seq]
split over the axes ``batch`` and ``seq`` map to), assembles per-process data into global
arrays, and checks rules and array sizes against the mesh before anything is compiled. It
knows no model, optimizer or trainer: callers pass shapes, axes and the names to report.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, "str | Sequence[str] | None"]]

# Logical axis names that models use; ``validate_rules`` refuses others on the left of a rule.
# ``layers`` counts the repeating units of a layer stack, ``sublayers`` the layers inside one unit,
# ``lora`` the rank of a low-rank adapter or moment.
LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "sublayers",
                "norm", "experts", "state", "inner", "lora")

# Logical axis -> mesh axes. Batch splits over data, fsdp and expert (expert-parallel devices are
# data-parallel outside the expert layers, as in GShard and Switch); FSDP shards the embedding
# dimension of every weight; tensor parallelism shards heads, MLP width and vocabulary.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", "context"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", "stage"),
    ("sublayers", None),
    ("norm", None),
    ("experts", "expert"),
    ("inner", "tensor"),  # Mamba's expanded channels
    ("state", None),  # Mamba's state dimension
    ("lora", None),  # low ranks: replicated
)

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
    """Within this context (and while tracing under it) ``constrain`` shards activations. It also sets the mesh's
    abstract mesh, which jit's trace cache keys on: a function traced outside the context is traced again inside."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def active():
    """The active (mesh, rules), or None. jit's cache keys on the mesh (``activate``) but not on the rules: a
    jitted function used under several rule tables takes this as a static argument (as ``generate`` does)."""
    return _ACTIVE.get()


def per_device(fn: Callable, in_names: Sequence[Sequence[str | None]], out_names) -> Callable:
    """``fn`` on each device's blocks of its arguments under the active mesh, or ``fn`` itself without one:
    ``jax.shard_map`` with specs from the logical axis names by the active rules, for kernels XLA cannot
    partition (custom calls). ``in_names``: one tuple of names per argument (``()``: replicated; any for a
    None argument, an empty pytree); ``out_names``: one tuple, or a tuple of tuples for several outputs."""
    current = active()
    if current is None:
        return fn
    mesh, rules = current
    spec = lambda names: logical_to_spec(names, rules)  # noqa: E731
    several = bool(out_names) and isinstance(out_names[0], tuple)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(spec, in_names)),
                         out_specs=tuple(map(spec, out_names)) if several else spec(out_names), check_vma=False)


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


def is_axes(x) -> bool:
    """A leaf of an axes tree: a tuple of logical names (or None), one per dimension; ``()`` for a scalar."""
    return type(x) is tuple and all(n is None or isinstance(n, str) for n in x)


def path_name(path) -> str:
    """'layers/wq' for a key path of ``jax.tree_util`` (dict keys, attributes and indices joined by '/')."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def check_axes(shapes: Any, axes: Any, what: str = "param_axes") -> None:
    """ValueError unless ``axes`` has the structure of ``shapes`` (arrays or ShapeDtypeStructs) and one
    logical name per dimension of each leaf."""
    if jax.tree.structure(shapes) != jax.tree.structure(axes, is_leaf=is_axes):
        raise ValueError(f"{what} does not have the structure of the arrays it describes; give one name tuple "
                         f"per array.")

    def check_rank(path, leaf, names):
        if len(names) != len(leaf.shape):
            raise ValueError(f"{what}{jax.tree_util.keystr(path)} is {names} but the array has shape "
                             f"{tuple(leaf.shape)}; give one logical name per dimension.")

    jax.tree_util.tree_map_with_path(check_rank, shapes, axes)


def check_divisibility(shapes: Any, axes: Any, mesh: Mesh, rules: Rules,
                       sizes: Mapping[str, tuple[int, str]] = ()) -> None:
    """Raise ValueError (one sentence naming what to change) for a size the mesh cannot split evenly.

    ``sizes``: logical axis -> (size, name) checked first, e.g. {'heads': (6, 'model.n_heads'),
    'batch': (8, 'train.batch_size')}: the name is what the message tells the user to change
    (activation axes, whose sizes no array here shows). Then every dimension of every array of
    ``shapes`` (e.g. ``jax.eval_shape`` of an init: parameters, optimizer state, adapters) against
    the mesh axes its logical name in ``axes`` maps to, the message naming the array's path.
    """
    table = dict(rules)
    for name, (size, label) in dict(sizes).items():
        targets = _targets(table.get(name))
        if targets and size % _axes_size(mesh, targets):
            raise ValueError(f"{label} ({size}) is not divisible by {_describe(mesh, targets)} that {name!r} maps "
                             f"to; change {label}, the mesh sizes, or the {name!r} sharding rule.")
    check_axes(shapes, axes, "axes")

    def check(path, leaf, names):
        for dim, (size, name, spec) in enumerate(zip(leaf.shape, names, logical_to_spec(names, rules))):
            targets = _targets(spec)
            if targets and size % _axes_size(mesh, targets):
                raise ValueError(f"{path_name(path)} has {name!r} dimension {dim} of size {size}, which "
                                 f"{_describe(mesh, targets)} that {name!r} maps to cannot split evenly; change "
                                 f"its size, the mesh sizes, or the {name!r} sharding rule.")

    jax.tree_util.tree_map_with_path(check, shapes, axes)


# ----------------------------------------------------------------------------- shardings

def tree_shardings(axes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A NamedSharding per leaf of ``axes_tree``, whose leaves are tuples of logical names (one per dim)."""
    return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, rules)), axes_tree,
                        is_leaf=is_axes)


def state_shardings(state_axes: Any, mesh: Mesh, rules: Rules, state_shape: Any = None) -> Any:
    """Shardings of a train state from its tree of logical axes (parameters' axes, the optimizer
    state's axes, ``()`` for scalars): the same tree with NamedSharding leaves, ready for ``jit``.
    With ``state_shape`` (e.g. from ``jax.eval_shape``) the axes are first checked against it
    (structure, one name per dimension)."""
    if state_shape is not None:
        check_axes(state_shape, state_axes, "state axes")
    return tree_shardings(state_axes, mesh, rules)


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


def logical_size(name: str) -> int:
    """How many devices the logical axis ``name`` is split over in the active layout (1 without one)."""
    layout = active()
    if layout is None:
        return 1
    mesh, rules = layout
    return _axes_size(mesh, _targets(logical_to_spec((name,), rules)[0]))


def batch_multiple() -> int:
    """Rows per batch must be a multiple of the mesh axes that ``batch`` maps to in the active
    layout (1 without one)."""
    return logical_size("batch")
