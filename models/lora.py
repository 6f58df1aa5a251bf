"""QLoRA (Dettmers et al. 2023): a frozen 4-bit NormalFloat base plus trainable low-rank adapters (Hu et al. 2021).

NF4 (QLoRA sec. 3, "4-bit NormalFloat"): the 16 levels q_i are quantiles of N(0, 1) normalised to [-1, 1],
with an exact zero: 8 positive levels at quantiles linspace(delta, 1/2, 9)[:-1] and 7 negative at
linspace(delta, 1/2, 8)[:-1] (mirrored), delta = 0.9677 (``NF4_LEVELS``: the table QLoRA ships). Blockwise
absmax: each block of ``block`` (64) consecutive input channels of one output column keeps
c = max |W_block| and the code argmin_i |W / c - q_i|; W ~ c q_code. (QLoRA's double quantization of c is
left out: c stays float32, 0.5 bytes/64 per parameter more.)

Adapter (LoRA eq. 3 with QLoRA's dropout): y = x W + (alpha / r) dropout(x) A B with A [in, r] ~ N(0, 1/in),
B [r, out] = 0 at init (so the adapted model starts as the base), alpha = r by default (scale 1), dropout
0.05 on the adapter's input while training. Dropout needs a key inside ``linear``: the train step's loss
runs under ``dropout_rng(rng)`` (``training_objective`` wraps an objective so), and each adapter folds in
its own ``seed`` leaf (one per weight and layer) so masks differ between layers under ``lax.scan``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import quant, weights

NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)

_RNG: contextvars.ContextVar = contextvars.ContextVar("loom_lora_dropout", default=None)


@contextlib.contextmanager
def dropout_rng(rng):
    """Adapters inside apply their dropout with keys from ``rng`` (None: no dropout, evaluation)."""
    token = _RNG.set(rng)
    try:
        yield
    finally:
        _RNG.reset(token)


@flax.struct.dataclass
class NF4(weights.Weight):
    """NF4 weight: codes uint8 [..., in/2, out] (two 4-bit codes per byte along ``in``), absmax float32
    [..., in/block, out]; W = NF4_LEVELS[code] * absmax of the code's block."""

    codes: Any
    absmax: Any
    block: int = flax.struct.field(pytree_node=False, default=64)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        idx = quant.unpack_nibbles(self.codes, self.codes.ndim - 2)
        *lead, n_in, out = idx.shape
        w = jnp.asarray(NF4_LEVELS)[idx].reshape(*lead, n_in // self.block, self.block, out) * self.absmax[..., None, :]
        return w.reshape(*lead, n_in, out).astype(dtype)

    def matmul(self, x, dot: weights.Dot):
        return dot(x, self.dequantize(x.dtype))

    def num_params(self) -> int:
        return int(np.prod(self.codes.shape)) * 2


def nf4(w: jax.Array, block: int = 64) -> NF4:
    """NF4 of w [..., in, out] with blocks of ``block`` input channels (must divide ``in``)."""
    n_in = w.shape[-2]
    if block <= 0 or n_in % block:
        raise ValueError(f"NF4 block size {block} does not divide the input dimension {n_in}; choose a divisor.")
    return _nf4(w, block)


@functools.partial(jax.jit, static_argnums=1)
def _nf4(w, block):
    *lead, n_in, out = w.shape
    wg = jnp.asarray(w, jnp.float32).reshape(*lead, n_in // block, block, out)
    absmax = jnp.max(jnp.abs(wg), axis=-2, keepdims=True)
    normed = wg / jnp.where(absmax > 0, absmax, 1.0)
    levels = jnp.asarray(NF4_LEVELS)
    # nearest level: midpoints between neighbouring levels split the line
    codes = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, normed).astype(jnp.uint8)
    return NF4(quant.pack_nibbles(codes.reshape(*lead, n_in, out), len(lead)), absmax[..., 0, :], block)


@flax.struct.dataclass
class Adapter(weights.Weight):
    """y = x base + scale * dropout(x) a b. base: any weight (an NF4 for QLoRA) [..., in, out]; a [..., in, r];
    b [..., r, out]; seed int32 [...] (one per weight and layer: its dropout stream)."""

    base: Any
    a: Any
    b: Any
    seed: Any
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    def num_params(self) -> int:
        """Entries of the adapted matrix (the adapters' bytes count towards its bytes per parameter)."""
        return self.base.num_params() if isinstance(self.base, weights.Weight) else int(np.prod(self.base.shape))

    def matmul(self, x, dot: weights.Dot):
        if dot.transpose:
            raise ValueError("adapters here sit on [in, out] projections, not on a tied embedding table.")
        rng = _RNG.get()
        xd = x
        if rng is not None and self.dropout > 0:
            key = jax.random.fold_in(rng, self.seed if self.seed.ndim == 0 else self.seed.reshape(-1)[0])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            xd = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        inner = dot._replace(out_dtype=None)
        base = weights._matmul(self.base, x, dot)
        delta = dot(inner(xd, self.a), self.b)
        return base + (self.scale * delta.astype(jnp.float32)).astype(base.dtype)


def is_mlp(path: str, names) -> bool:
    """The MLP matrices of every layer (W_gate, W_up, W_down; Switch experts included)."""
    return path.startswith("layers/") and path.rsplit("/", 1)[-1] in ("w_gate", "w_up", "w_down")


def qlora(params: dict, axes: dict, rng: jax.Array, *, rank: int = 8, alpha: float | None = None,
          dropout: float = 0.05, block: int = 64, where=is_mlp, quantize_base: bool = True) -> tuple[dict, dict]:
    """Wrap the selected weights (default: the MLP matrices) as ``Adapter(NF4 base, A, B = 0)`` -> (params, axes).

    alpha defaults to rank (scale alpha / rank = 1). With ``quantize_base=False`` the base stays float (LoRA)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank is {rank}; use a positive integer.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout is {dropout}; use a rate in [0, 1).")
    scale = (rank if alpha is None else alpha) / rank
    counter = iter(range(1, 1 << 30))

    def make(path, w, names):
        *lead, d_in, d_out = w.shape
        ka, _ = jax.random.split(jax.random.fold_in(rng, next(counter)))
        a = (jax.random.normal(ka, (*lead, d_in, rank), jnp.float32) / np.sqrt(d_in)).astype(w.dtype)
        b = jnp.zeros((*lead, rank, d_out), w.dtype)
        n = next(counter)
        seed = (jnp.arange(int(np.prod(lead)), dtype=jnp.int32) + n * 100003).reshape(lead)
        base = nf4(w, block) if quantize_base else w
        base_axes = NF4(tuple(names), tuple(names), block) if quantize_base else tuple(names)
        lead_names = tuple(names[:-2])
        node_axes = Adapter(base_axes, (*names[:-1], "lora"), (*names[:-2], "lora", names[-1]), lead_names, scale,
                            dropout)
        return Adapter(base, a, b, seed, scale, dropout), node_axes

    new_params, new_axes = weights.wrap(params, axes, make, where)
    if not any(isinstance(w, Adapter) for w in jax.tree.leaves(new_params, is_leaf=lambda x: isinstance(x, Adapter))):
        raise ValueError("no weight was selected for adapters (the default selects the MLP matrices w_gate, w_up, "
                         "w_down of a Transformer); pass where= for this model.")
    return new_params, new_axes


FROZEN_ALL_BUT_ADAPTERS = r"(?!.*/(a|b)$).*"  # optim.frozen: every path but the adapters' a and b


def training_objective(objective):
    """``objective`` whose training loss runs under ``dropout_rng(rng)`` (adapter dropout); eval unchanged."""
    def loss(model, mcfg, params, batch, *, train=False, rng=None):
        with dropout_rng(rng if train else None):
            return objective.loss(model, mcfg, params, batch, train=train, rng=rng)

    return dataclasses.replace(objective, loss=loss)


def merge(params: dict) -> dict:
    """Adapters folded back into float weights: base (dequantized) + scale a b."""
    def one(w):
        if isinstance(w, Adapter):
            base = w.base.dequantize() if isinstance(w.base, NF4) else jnp.asarray(w.base, jnp.float32)
            return base + w.scale * jnp.einsum("...ir,...ro->...io", w.a.astype(jnp.float32), w.b.astype(jnp.float32))
        return w.dequantize() if isinstance(w, NF4) else w

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, weights.Weight))
