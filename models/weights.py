"""Weight types for ``layers.linear``: a weight is a plain array or a ``Weight`` pytree node with its own matmul.

A projection y = x W is requested through ``layers.linear`` in one of three forms, described
by a ``Dot`` (the op on a plain array of the weight's layout):

    dense    x [..., in]        W [in, out]              -> [..., out]   (``transpose``: W [out, in], x W^T)
    experts  x [..., E, C, in]  W [E, in, out]           -> [..., E, C, out]
    ragged   x [M, in] (rows sorted by expert), W [E, in, out], group_sizes [E] -> [M, out]

A ``Weight`` subclass implements ``matmul(x, dot)`` from ``dot(x, array)`` calls on its parts (a
quantized weight dequantizes, or runs its own kernel for ``dot.form``), and ``rows(tokens, dtype)``
for an embedding lookup. Its ``param_axes`` entry is the same node type holding logical-axis tuples,
so ``jax.tree.map(f, params, axes, is_leaf=is_axes)`` pairs arrays with their axes and sharding,
divisibility checks and masks work on trees holding such weights unchanged.

``LoRA`` (Hu et al. 2021) is the toy type here: W = base + scale * a b, a [..., in, r], b [..., r, out];
y = x base + scale (x a) b, never forming a b.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from parallel.sharding import is_axes  # noqa: F401  (a leaf of a param_axes tree, re-exported)

_SAME = object()


class Dot(NamedTuple):
    """The linear op ``layers.linear`` asks for, applied by ``__call__`` to a plain array ``w``."""

    form: str = "dense"  # "dense" | "experts" | "ragged"
    transpose: bool = False  # dense only: x @ w.T
    out_dtype: Any = None
    group_sizes: Any = None  # ragged only
    precision: Any = None

    def __call__(self, x: jax.Array, w: jax.Array, out_dtype: Any = _SAME) -> jax.Array:
        """x times the plain array w in this form; ``out_dtype`` overrides the requested result dtype."""
        from models import layers  # the plain-array kernels live with linear

        return layers.plain_dot(self if out_dtype is _SAME else self._replace(out_dtype=out_dtype), x, w)


class Weight:
    """Base of weight types: pytree nodes (e.g. ``flax.struct.dataclass``) with ``matmul`` and ``rows``."""

    out_last = False  # every part's last axis is the output axis: weights of one type and static fields join
    #                   along it (``join_out``) into the weight of the joined columns

    def matmul(self, x: jax.Array, dot: Dot) -> jax.Array:
        raise NotImplementedError

    def rows(self, tokens: jax.Array, dtype) -> jax.Array:
        """Rows of the weight [vocab, d] for integer tokens (a tied embedding table): [..., d]."""
        raise NotImplementedError


@flax.struct.dataclass
class LoRA(Weight):
    """W = base + scale * a @ b; base [..., in, out], a [..., in, r], b [..., r, out] (leading axes:
    layers, sublayers, experts). Its axes node: ``LoRA(base_axes, a_axes, b_axes, scale)``."""

    base: Any
    a: Any
    b: Any
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    def matmul(self, x, dot: Dot):
        inner = dot._replace(out_dtype=None)
        # x W = x base + scale (x a) b;  transposed: x W^T = x base^T + scale (x b^T) a^T.
        delta = dot(inner(x, self.b), self.a) if dot.transpose else dot(inner(x, self.a), self.b)
        base = _matmul(self.base, x, dot)
        return base + (self.scale * delta.astype(jnp.float32)).astype(base.dtype)

    def rows(self, tokens, dtype):
        base = _rows(self.base, tokens, dtype)
        delta = jnp.take(self.a, tokens, axis=0).astype(jnp.float32) @ self.b.astype(jnp.float32)
        return base + (self.scale * delta).astype(dtype)


@flax.struct.dataclass
class OutMajor(Weight):
    """A dense weight stored out-major: ``t`` [out, in] = W^T. Batch-1 decoding's layout on a GPU
    (``models.transformer.decode_params``): ``decode_matmul``'s out-major kernels read each output's weights as one
    contiguous row, where a narrow column slice of [in, out] is a strided read. Dense form only."""

    t: Any

    def matmul(self, x, dot: Dot):
        if dot.form != "dense":
            raise ValueError(f"an OutMajor weight multiplies in the dense form only, not {dot.form!r}.")
        return dot._replace(transpose=not dot.transpose)(x, self.t)


def join_out(ws: list):
    """The weights ``ws`` [..., in, out_i] joined along the output axis ([..., in, sum out_i]): plain arrays, or
    weights of one ``out_last`` type with equal static fields; None when they cannot be joined."""
    if all(isinstance(w, jax.Array) for w in ws):
        return jnp.concatenate(ws, axis=-1)
    kinds = {jax.tree.structure(w) for w in ws}
    if len(kinds) == 1 and isinstance(ws[0], Weight) and ws[0].out_last:
        return jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=-1), *ws)
    return None


def _matmul(w, x, dot: Dot):
    return w.matmul(x, dot) if isinstance(w, Weight) else dot(x, w)


def _rows(w, tokens, dtype):
    return w.rows(tokens, dtype) if isinstance(w, Weight) else jnp.take(w, tokens, axis=0).astype(dtype)


def lora_init(w: jax.Array, names: tuple, rng: jax.Array, *, rank: int, scale: float = 1.0,
              zero_b: bool = True) -> tuple[LoRA, LoRA]:
    """(LoRA over ``w`` [..., in, out], its axes node). a ~ N(0, 1/in) [..., in, rank]; b zero (or N(0, 1/rank)
    with ``zero_b=False``) [..., rank, out]; the rank axis is the logical axis ``lora``."""
    *lead, d_in, d_out = w.shape
    ka, kb = jax.random.split(rng)
    a = (jax.random.normal(ka, (*lead, d_in, rank), jnp.float32) / jnp.sqrt(d_in)).astype(w.dtype)
    b = (jnp.zeros((*lead, rank, d_out), w.dtype) if zero_b else
         (jax.random.normal(kb, (*lead, rank, d_out), jnp.float32) / jnp.sqrt(rank)).astype(w.dtype))
    axes = LoRA(names, (*names[:-1], "lora"), (*names[:-2], "lora", names[-1]), scale)
    return LoRA(w, a, b, scale), axes


def wrap(params: Any, axes: Any, make: Callable, where: Callable) -> tuple[Any, Any]:
    """Replace the weights selected by ``where(path, names)`` by ``make(path, w, names) -> (weight, axes node)``.

    path: the leaf's key path as a '/'-joined string ("layers/wq", "layers/moe/w_gate"); names its
    logical axes. Returns (new params, new axes), same structure as each other.
    """
    flat_axes = {jax.tree_util.keystr(p, simple=True, separator="/"): a
                 for p, a in jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)[0]}
    new_axes: dict[str, Any] = {}

    def one(path, w):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        names = flat_axes[key]
        if not where(key, names):
            new_axes[key] = names
            return w
        w, new_axes[key] = make(key, w, names)
        return w

    new_params = jax.tree_util.tree_map_with_path(one, params)
    treedef = jax.tree.structure(params)
    return new_params, jax.tree.unflatten(treedef, [new_axes[jax.tree_util.keystr(p, simple=True, separator="/")]
                                                    for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]])
