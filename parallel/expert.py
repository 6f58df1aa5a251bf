"""Expert parallelism for the Switch layer (Fedus et al. 2021, sec. 2.2 and fig. 9): experts on the ``expert`` mesh axis.

The routing (router, top-k, capacity slots, aux losses) and the gather into dispatch
buffers [groups, experts, capacity, d] run under ``jit`` like any other layer: the group
axis is split over the token (batch) mesh axes, so every device routes its own groups.
Only the expert computation runs in ``shard_map``, because its collective schedule is the
algorithm::

    [G/n, E, C, d]    this device's groups, slots for every expert
      all_to_all      split E over the X devices of the expert axis, concatenate groups
    [X*G/n, E/X, C, d]  this device's experts, their slots from the X devices' groups
      expert_fn       batched matmul with the local expert weights [E/X, ...]
      all_to_all      back: split groups, concatenate experts
    [G/n, E, C, d]

(n = devices over the group axes.) Groups are whole on one device and capacity is per
group, so the result is the single-device result whatever the mesh. The expert weights
enter with only their expert axis split (``P(expert)``); ``jit`` gathers any FSDP or tensor
shards of them before the ``shard_map`` and reduce-scatters their gradients after it.

This module knows nothing about routing: ``expert_parallel`` runs any ``expert_fn`` over
buffers. ``models.moe.apply`` calls it when ``parallel.sharding.active()`` has a mesh whose
``experts`` rule points at an axis of size > 1.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from parallel.sharding import Rules, _axes_size, _describe, _targets


def expert_axis(mesh: Mesh, rules: Rules) -> str | None:
    """The mesh axis the ``experts`` logical axis maps to, when its size is > 1; else None (no expert parallelism)."""
    axes = [a for a in _targets(dict(rules).get("experts")) if a in mesh.shape and mesh.shape[a] > 1]
    if len(axes) > 1:
        raise ValueError(f"sharding rule ('experts', {dict(rules)['experts']!r}) splits experts over several mesh axes "
                         f"of size > 1 ({axes}); map 'experts' to one mesh axis (e.g. 'expert').")
    return axes[0] if axes else None


def group_axes(mesh: Mesh, rules: Rules, axis: str) -> tuple[str, ...]:
    """Mesh axes the routing groups are split over: those of ``batch``, then ``seq``, then the expert ``axis``.

    Tokens are flattened batch-major, so this order keeps each device's groups inside its
    batch (and sequence) shard; the expert axis subdivides them.
    """
    table = dict(rules)
    axes = [a for name in ("batch", "seq") for a in _targets(table.get(name)) if a in mesh.shape]
    return tuple(dict.fromkeys([*axes, axis]))


def check(num_experts: int, n_groups: int | None, mesh: Mesh, rules: Rules) -> tuple[str, tuple[str, ...]] | None:
    """(expert axis, group axes) for this mesh and rules, or None without expert parallelism.

    Raises ValueError (naming the field and the fix) when the experts or the ``n_groups``
    routing groups (None: not checked) do not split evenly over the devices.
    """
    axis = expert_axis(mesh, rules)
    if axis is None:
        return None
    if num_experts % mesh.shape[axis]:
        raise ValueError(f"moe.num_experts ({num_experts}) is not divisible by the {axis} mesh axis "
                         f"({mesh.shape[axis]}); make num_experts a multiple of mesh.{axis}.")
    gaxes = group_axes(mesh, rules, axis)
    n = _axes_size(mesh, gaxes)
    if n_groups is not None and n_groups % n:
        raise ValueError(f"the batch holds {n_groups} MoE routing groups, which {_describe(mesh, gaxes)} "
                         f"cannot split evenly; make batch*seq/moe.group_size a multiple of {n} (smaller "
                         f"moe.group_size or a larger batch).")
    return axis, gaxes


def expert_parallel(expert_fn: Callable, weights: Any, buffers: jax.Array, tags: Any = (), shared: Any = (), *,
                    mesh: Mesh, axis: str, gaxes: Sequence[str]) -> jax.Array:
    """``expert_fn(weights, buffers, tags, shared)`` with experts sharded over mesh axis ``axis``.

    weights: pytree of [E, ...] arrays (every leaf has the experts first).
    buffers: [G, E, C, d] dispatch buffers, G split over ``gaxes`` (see ``group_axes``).
    tags: pytree of [G, E, ...] arrays that travel with the buffers (e.g. slot ids for dropout keys).
    shared: pytree passed to every device whole (e.g. a PRNG key).
    ``expert_fn`` must treat the leading two axes as a batch of (group, expert) pairs: it
    sees [G', E/X, C, d] buffers with [E/X, ...] weights. Returns [G, E, C, d] like ``buffers``.
    """
    tokens = P(tuple(gaxes))
    to_experts = lambda t: jax.lax.all_to_all(t, axis, 1, 0, tiled=True)  # noqa: E731

    def local(w, buf, tag, sh):
        out = expert_fn(w, to_experts(buf), jax.tree.map(to_experts, tag), sh)
        return jax.lax.all_to_all(out, axis, 0, 1, tiled=True)

    specs = (jax.tree.map(lambda _: P(axis), weights), tokens, jax.tree.map(lambda _: tokens, tags),
             jax.tree.map(lambda _: P(), shared))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tokens)(weights, buffers, tags, shared)
