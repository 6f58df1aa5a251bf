"""Activation capture: named taps collected in one forward pass (calibration, pruning).

    with capture.taps(linears=True, hidden=True) as got:
        logits, aux = model.apply(params, tokens, cfg)
    got.linears  # {"layer1/wq": {"absmax": [in], "mean_abs": [in], "count": []}, ..., "head": {...}}: float32
    got.hidden   # {"layer0": x_0, ..., "layer<L>": x_L}: every layer's input, and the last output

``linears``: per input channel, max |x| and mean |x| over every token of the batch, of the input
of every projection (``layers.linear(..., name=...)``), keyed "layer<i>/<weight name>" with i the
global layer index (the LM head: "head"). Switch experts are tapped per expert: the inputs of
w_gate / w_up (the normed tokens routed to each expert, after capacity) and of w_down (each
expert's hidden activations) give [num_experts, in] statistics over the tokens each expert
processed (an expert that got none: 0); the router's input is "layer<i>/router". "count": the rows
the statistics cover ([] or [num_experts]), so batches combine exactly. ``taps(inputs=k)`` also
keeps up to k rows of each input, evenly strided, as "inputs" [k', in] float32 (with experts their
expert ids as "segments" [k'], num_experts for an empty slot): the samples AWQ's search runs on.
``hidden``: "layer<i>" is the residual stream entering layer i, [batch, seq, d_model] in the
compute dtype (``stack_hidden`` stacks them [L + 1, ...]).

Works under ``jit``: open the context inside the jitted function and return ``got.linears`` /
``got.hidden`` from it. While a capture is open the families run their layers in a Python loop
without remat (a ``lax.scan`` or ``checkpoint`` cannot leak values) and the Switch experts run on
one device's view (no expert-parallel ``shard_map``); the results are those of the plain forward.
A name recorded twice in one capture is an error (one forward pass per capture).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("loom_capture", default=None)
_LAYER: contextvars.ContextVar = contextvars.ContextVar("loom_capture_layer", default=None)


@dataclasses.dataclass
class Captured:
    """What one capture collected; ``linears`` and ``hidden`` are dicts of arrays (pytrees)."""

    want_linears: bool
    want_hidden: bool
    inputs: int = 0
    linears: dict = dataclasses.field(default_factory=dict)
    hidden: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def taps(*, linears: bool = False, hidden: bool = False, inputs: int = 0) -> Iterator[Captured]:
    """Collect linear-input statistics (with ``inputs`` > 0 also that many sampled input rows per linear)
    and/or per-layer hidden states of the forward passes run inside."""
    token = _ACTIVE.set(Captured(linears or inputs > 0, hidden, int(inputs)))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """Whether a capture is open (the families then run their layers unrolled, without remat)."""
    return _ACTIVE.get() is not None


@contextlib.contextmanager
def layer(index: int) -> Iterator[None]:
    """Tap names inside are prefixed "layer<index>/"."""
    token = _LAYER.set(int(index))
    try:
        yield
    finally:
        _LAYER.reset(token)


def _key(name: str) -> str:
    i = _LAYER.get()
    return name if i is None else f"layer{i}/{name}"


def _put(table: dict, key: str, value) -> None:
    if key in table:
        raise ValueError(f"capture: {key!r} was recorded twice; open one capture per forward pass.")
    table[key] = value


def hidden(index: int, x: jax.Array) -> None:
    """Record the residual stream entering layer ``index`` (or leaving the last one)."""
    c = _ACTIVE.get()
    if c is not None and c.want_hidden:
        _put(c.hidden, f"layer{int(index)}", x)


def linear_input(name: str, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 num_segments: int | None = None) -> None:
    """Record per-channel abs-max and mean |x| of a projection's input x [..., in], float32.

    With ``segment_ids`` (int, x's leading shape; ids outside [0, num_segments) are ignored: empty
    slots) the statistics are per segment (per expert): [num_segments, in].
    """
    c = _ACTIVE.get()
    if c is None or not c.want_linears:
        return
    a = jnp.abs(x.astype(jnp.float32))
    if segment_ids is None:
        a = a.reshape(-1, a.shape[-1])
        stats = {"absmax": jnp.max(a, axis=0), "mean_abs": jnp.mean(a, axis=0),
                 "count": jnp.asarray(a.shape[0], jnp.float32)}
    else:
        a, ids = a.reshape(-1, a.shape[-1]), segment_ids.reshape(-1)
        ids = jnp.where((ids >= 0) & (ids < num_segments), ids, num_segments)
        count = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_segments + 1)[:num_segments]
        total = jax.ops.segment_sum(a, ids, num_segments + 1)[:num_segments]
        peak = jax.ops.segment_max(a, ids, num_segments + 1)[:num_segments]  # -inf where empty
        stats = {"absmax": jnp.maximum(peak, 0.0), "mean_abs": total / jnp.maximum(count, 1.0)[:, None],
                 "count": count}
    if c.inputs:
        rows = x.reshape(-1, x.shape[-1])
        stride = max(1, rows.shape[0] // c.inputs)
        stats["inputs"] = rows[::stride][:c.inputs].astype(jnp.float32)
        if segment_ids is not None:
            stats["segments"] = ids[::stride][:c.inputs]
    _put(c.linears, _key(name), stats)


def stack_hidden(hidden_states: dict) -> jax.Array:
    """The captured hidden states as one array [L + 1, ...] in layer order."""
    return jnp.stack([hidden_states[f"layer{i}"] for i in range(len(hidden_states))])
