"""GPipe: micro-batch pipeline parallelism over the ``stage`` mesh axis (Huang et al. 2019).

The stacked layer units ([U, ...] on the ``layers`` axis) are cut into K stages of n = U / K
consecutive units, stage k on the k-th slice of the ``stage`` mesh axis (where the
``layers -> stage`` rule already stores them). The batch is cut into M micro-batches. At clock
tick t, stage k runs micro-batch t - k, so all K stages work at once once the pipeline is full;
after each tick every stage's output moves to the next stage (a shift along the stage axis,
which lowers to a collective-permute). The forward takes T = M + K - 1 ticks, of which each
stage idles K - 1: the bubble's share of the schedule is

    (K - 1) / (M + K - 1)                                   (GPipe, sec. 2.2)

The backward pass is the autodiff of the same scan (so it runs the ticks in reverse), the
gradients of all micro-batches accumulate in it, and the optimizer update that follows is
synchronous. Re-materialisation (GPipe sec. 2.2): with ``remat='full'`` each stage keeps only
its input per micro-batch (the boundary activation) and recomputes its inside in the backward
pass; any ``jax.checkpoint`` policy can be given instead.

Circular (interleaved) schedule, ``repeats`` = V > 1 (Narayanan et al. 2021, sec. 2.2): the
units are cut into K V virtual stages of n = U / (K V) units; virtual stage j = v K + k runs
on device k, so a micro-batch loops V times around the K devices. Device k at tick t works on
item i = t - k, micro-batch i mod M in round i div M; the last device's outputs wait in a
buffer until device 0 takes them for the next round (M >= K, so that the wait is never
negative). T = V M + K - 1 ticks of a 1/V-size stage: the bubble's share is

    (K - 1) / (V M + K - 1)

The stage weights are regrouped [V, K, n, ...]; with the contiguous ``layers -> stage`` storage
this moves weights between devices once per step (and their gradients back), a cost the
non-circular schedule does not have.

Formulation: the K stages are a ``vmap`` over the stage dimension of the stage weights and of
a state buffer [K, micro-batch...], both sharded over the stage axis (``spmd_axis_name``), so
``jit`` gives each device its stage and the model's own sharding constraints (data, FSDP,
tensor axes) keep working inside the stage. This module knows no model family: it runs any
``stage_fn(params, x, extras, stage) -> (y, aux)``.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel import sharding

# Stage re-materialisation by name: "none" keeps what the stage body keeps (its own remat, if
# any); "full" keeps only each stage's input per micro-batch; "dots" also keeps matmul outputs.
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The idle share of the schedule: (K - 1) / (V M + K - 1)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def check(units: int, batch: int, *, stages: int, microbatches: int, repeats: int = 1, batch_shards: int = 1,
          units_name: str = "the layer units", batch_name: str = "the batch") -> None:
    """ValueError (one sentence naming what to change) unless the sizes fit the schedule: ``units``
    divisible by stages x repeats, ``batch`` by microbatches x ``batch_shards`` (the devices a
    micro-batch's rows split over), and microbatches >= stages with the circular schedule."""
    for name, value in (("stages", stages), ("microbatches", microbatches), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"pipeline {name} is {value!r}; use a positive integer.")
    if units % (stages * repeats):
        raise ValueError(f"{units_name} ({units}) cannot be split into {stages} stages x {repeats} circular repeats; "
                         f"make the units a multiple of {stages * repeats} or change mesh.stage / "
                         f"pipeline.circular_repeats (uneven stages are not supported).")
    if batch % (microbatches * batch_shards):
        raise ValueError(f"{batch_name} ({batch}) is not divisible by pipeline.microbatches ({microbatches}) x the "
                         f"{batch_shards} devices each micro-batch splits over; change one of them.")
    if repeats > 1 and microbatches < stages:
        raise ValueError(f"the circular schedule needs pipeline.microbatches ({microbatches}) >= mesh.stage "
                         f"({stages}); raise the micro-batches or set pipeline.circular_repeats=1.")


def split_microbatches(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B / M, ...]; micro-batch i takes rows i, i + M, ... (so each data shard holds
    its share of every micro-batch)."""
    return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of ``split_microbatches``: [M, B / M, ...] -> [B, ...]."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _constrain(x, mesh, axis, dim):
    """Shard dimension ``dim`` of ``x`` over ``axis``; leave the others to the partitioner."""
    if mesh is None:
        return x
    spec = [P.UNCONSTRAINED] * x.ndim
    spec[dim] = axis
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def pipeline(stage_fn: Callable, params: Any, x: jax.Array, extras: Any = None, *, stages: int, repeats: int = 1,
             remat: str | Callable | None = "full", mesh=None, axis: str = "stage"):
    """Run micro-batches ``x`` [M, ...] through the stages of ``params`` with the GPipe schedule.

    stage_fn(stage_params, x_i, extras_i, stage) -> (y_i, aux): one (virtual) stage on one
    micro-batch; stage_params: ``params`` with leading axis [n] (that stage's units), x_i / y_i
    [...] (same shape and dtype), extras_i: ``extras``' leaves at that micro-batch (e.g. positions,
    segment ids: they travel with it), stage: the int32 virtual-stage index j (traced). aux: a
    pytree of float scalars.
    params: leaves [U, ...], U = stages x repeats x n; virtual stage j holds units [j n, (j+1) n).
    extras: a pytree with leaves [M, ...], or None.
    remat: a key of ``REMAT``, or a ``jax.checkpoint`` policy for the stage body (None: save nothing).
    mesh: the mesh whose ``axis`` holds the stages (default: the active one of ``parallel.sharding``,
    or none: then it is only a schedule, which still equals the sequential model).

    Returns (y [M, ...]: the last stage's outputs, aux with leaves [stages x repeats]: each virtual
    stage's aux summed over the micro-batches).
    """
    K, V, M = stages, repeats, x.shape[0]
    units = jax.tree.leaves(params)[0].shape[0]
    check(units, M, stages=K, microbatches=M, repeats=V)
    n = units // (K * V)
    if mesh is None and sharding.active() is not None:
        mesh = sharding.active()[0]
    if mesh is not None and mesh.shape[axis] != K:
        raise ValueError(f"pipeline stages ({K}) differ from the {axis!r} mesh axis ({mesh.shape[axis]}).")
    policy = REMAT[remat] if isinstance(remat, str) else remat

    def body(p, v, xi, ei, j):
        # The round's weights are picked inside the checkpoint: what it saves per tick is then the stage's
        # input, while the weights [V, n, ...] it also saves are loop-invariant (no copy per tick).
        pv = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, v, 0, keepdims=False), p)
        return stage_fn(pv, xi, ei, j)

    if not (isinstance(remat, str) and remat == "none"):
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)

    # [U, ...] -> [V, K, n, ...]: virtual stage v K + k on device k.
    sp = jax.tree.map(lambda a: _constrain(a.reshape(V, K, n, *a.shape[1:]), mesh, axis, 1), params)
    extras = {} if extras is None else extras
    ks = jnp.arange(K, dtype=jnp.int32)

    def run(p, v, k, xi, ei):  # device k: its weights [V, n, ...], round v
        return body(p, v, xi, ei, v * K + k)

    spmd = axis if mesh is not None else None
    stage_all = jax.vmap(run, in_axes=(1, 0, 0, 0, 0), spmd_axis_name=spmd)
    take = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)

    aux_shape = jax.eval_shape(lambda: stage_fn(jax.tree.map(lambda a: a[0, 0], sp), x[0], take(extras, 0),
                                                jnp.int32(0)))[1]
    acc0 = jax.tree.map(lambda s: jnp.zeros((K, V), s.dtype), aux_shape)
    state0 = jnp.zeros((K, *x.shape[1:]), x.dtype).at[0].set(x[0])
    ext0 = jax.tree.map(lambda a: jnp.zeros((K, *a.shape[1:]), a.dtype).at[0].set(a[0]), extras)
    items = M * V

    def tick(carry, t):
        state, ext, out, acc = carry
        state = _constrain(state, mesh, axis, 0)
        i = t - ks
        valid = (i >= 0) & (i < items)
        v = jnp.clip(i, 0, items - 1) // M
        y, aux = stage_all(sp, v, ks, state, ext)
        hot = jax.nn.one_hot(v, V, dtype=jnp.float32) * valid[:, None]
        acc = jax.tree.map(lambda s, a: s + (hot * jnp.where(valid, a, 0)[:, None]).astype(s.dtype), acc, aux)
        shifted = jnp.roll(y, 1, axis=0)  # to the next stage; shifted[0]: the last device's output, on device 0
        last = t - (K - 1)  # the item the last device finished
        slot = jnp.clip(last, 0, items - 1) % M
        keep = jax.lax.dynamic_index_in_dim(out, slot, 1, keepdims=False)
        out = _constrain(jax.lax.dynamic_update_index_in_dim(out, jnp.where(last >= 0, shifted, keep), slot, 1),
                         mesh, axis, 0)  # each device writes its own row; row 0 (device 0's) is the output
        nxt = (t + 1) % M  # what device 0 takes next: a fresh micro-batch in round 0, else the buffered one
        first = jnp.where(t + 1 < M, take(x, nxt), take(out[0], nxt))
        state = shifted.at[0].set(first)
        ext = jax.tree.map(lambda e, a: jnp.roll(e, 1, axis=0).at[0].set(take(a, nxt)), ext, extras)
        return (state, ext, out, acc), None

    out0 = _constrain(jnp.zeros((K, *x.shape), x.dtype), mesh, axis, 0)  # [K, M, ...]: a buffer per device
    (_, _, out, acc), _ = jax.lax.scan(tick, (state0, ext0, out0, acc0), jnp.arange(items + K - 1, dtype=jnp.int32))
    return out[0], jax.tree.map(lambda a: a.T.reshape(K * V), acc)


# ----------------------------------------------------------------------------- the model protocol

_LAYER = re.compile(r"layer(\d+)$")


class Pipelined:
    """A model family's module whose ``blocks`` runs the layer stack as a pipeline; every other
    function (init, param_axes, embed, head, ...) is the family's own, so embeddings and the output
    head stay outside the stages.

    ``blocks(layer_params, x [B, S, D], cfg, positions=..., segment_ids=..., train=..., rng=...)``
    splits the batch into ``microbatches`` (positions and segment ids travel with each), runs each
    virtual stage as the family's ``blocks`` on its n units, and returns (x, None, aux) as the family
    would: aux losses are the stages' sums averaged over the (equal-size) micro-batches, and the
    metrics "…/layer<i>" of each stage are renamed to their global layer index. Stages call the
    family with local unit ids and the key fold_in(fold_in(rng, stage), micro-batch), so masks drawn
    in training (Switch expert dropout) differ from the unpipelined run's, as they do under gradient
    accumulation. Cached decoding and ``layer_ids`` slices run unpipelined.
    """

    def __init__(self, model, *, stages: int, microbatches: int, repeats: int = 1, remat="full", mesh=None,
                 axis: str = "stage"):
        self._model = model
        self.stages, self.microbatches, self.repeats, self.remat = stages, microbatches, repeats, remat
        self.mesh, self.axis = mesh, axis

    def __getattr__(self, name):
        return getattr(self._model, name)

    def blocks(self, layer_params, x, cfg, *, positions=None, segment_ids=None, cache=None, train=False, rng=None,
               layer_ids=None):
        model = self._model
        if cache is not None or layer_ids is not None:
            return model.blocks(layer_params, x, cfg, positions=positions, segment_ids=segment_ids, cache=cache,
                                train=train, rng=rng, layer_ids=layer_ids)
        K, V, M = self.stages, self.repeats, self.microbatches
        units = jax.tree.leaves(layer_params)[0].shape[0]
        check(units, x.shape[0], stages=K, microbatches=M, repeats=V, batch_name="the batch reaching the layers")
        n = units // (K * V)
        per = model.layers_per_unit(cfg)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        extras = {"positions": positions, "microbatch": jnp.arange(x.shape[0], dtype=jnp.int32) % M}
        if segment_ids is not None:
            extras["segment_ids"] = segment_ids
        extras = jax.tree.map(lambda a: split_microbatches(a, M), extras)
        local = np.arange(n)

        def stage_fn(p, xi, ei, stage):
            key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, stage), ei["microbatch"][0])
            y, _, aux = model.blocks(p, xi, cfg, positions=ei["positions"], segment_ids=ei.get("segment_ids"),
                                     train=train, rng=key, layer_ids=local)
            return y, {"losses": dict(aux.get("losses") or {}), "metrics": dict(aux.get("metrics") or {})}

        y, aux = pipeline(stage_fn, layer_params, split_microbatches(x, M), extras, stages=K, repeats=V,
                          remat=self.remat, mesh=self.mesh, axis=self.axis)
        losses = {k: jnp.sum(v) / M for k, v in aux["losses"].items()}
        metrics = {}
        for name, values in aux["metrics"].items():
            match = _LAYER.search(name)
            for j in range(K * V):
                key = name if match is None else name[:match.start(1)] + str(int(match.group(1)) + j * n * per)
                metrics[key] = metrics.get(key, 0) + values[j] / M
        return merge_microbatches(y), None, {"losses": losses, "metrics": metrics}
