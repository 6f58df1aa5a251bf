"""Sharding as data: logical axis names, one rules table, NamedShardings.

Every parameter and activation carries logical axis names (``batch``, ``seq``, ``embed``,
``heads``, ``kv_heads``, ``mlp``, ``vocab``, ``layers``...). A rules table, set in the
config, maps each logical name to mesh axes (``data``, ``fsdp``, ``tensor``, ``stage``,
``context``, ``expert``) or to None (replicated). Model code calls ``constrain(x, names)``
at layer boundaries; it is a no-op unless a mesh and rules are active.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, "str | Sequence[str] | None"]]

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("loom_sharding", default=None)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for one array's logical axis names; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
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


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; identity when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
