"""GaLore: gradient low-rank projection around any optax transformation.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (2024),
Algorithm 1. For a selected weight whose gradient is the matrix G_t (m x n), every ``gap`` steps
(at t % gap == 0, t counting updates from 0) the projector is recomputed from the SVD of the
current gradient, G_t = U S V^T (float32, always; the needed side's vectors come from the
eigendecomposition of its Gram matrix, G G^T = U S^2 U^T or G^T G = V S^2 V^T), and

    R_t = P_t^T G_t        (m < n, "left":  P_t = U[:, :r],  R_t is r x n)
    R_t = G_t Q_t          (m >= n, "right": Q_t = V[:, :r], R_t is m x r)
    N_t = inner(R_t)       (e.g. Adam's m_t / (sqrt(v_t) + eps), its moments r x n or m x r)
    update = scale * P_t N_t   resp.   scale * N_t Q_t^T

so the inner transformation's state lives in the projected space. ``proj_type`` 'std' picks the
side as above (the smaller dimension is projected, as the official implementation does);
'left' and 'right' force one side; 'full' projects both (R_t = P_t^T G_t Q_t, r x r). Each
singular vector's sign is fixed (its largest-magnitude entry positive), so that a refresh is
reproducible: moments carried across a refresh meet the new basis with a defined orientation.
``randomized_svd`` replaces the exact SVD by a randomized range finder (Halko, Martinsson &
Tropp 2011, Algorithms 4.4 and 5.1: r + 8 samples, 2 power iterations).

Which dimensions form the matrix comes from the parameter's logical axes: the stacking axes
``layers``, ``sublayers`` and ``experts`` are batch dimensions (one SVD per layer, batched);
of the rest, the ``embed`` dimension is one side and the others, flattened, the other (an
attention weight stored as [embed, heads, head_dim] is the (embed, heads * head_dim) matrix).

This transform only scales gradients: the inner transformation gets ``params=None`` and must
not need them (scale_by_adam, scale_by_lion, scale_by_factored_rms, trace...). Decoupled weight
decay and the learning rate go after it, on the full weight, as in the paper's GaLore-AdamW:

    chain(galore(scale_by_adam(), ...), add_decayed_weights(wd, mask), scale_by_learning_rate(lr))

(``train.optim``'s "galore" optimizer builds exactly this around ``optim.galore_inner``).

Difference from ``optax.contrib.galore`` (optax 0.2.8): for m >= n optax projects with the left
singular vectors (U_r^T G, r x n moments, an m x r projector) and for m < n with the right ones,
the opposite of the official implementation followed here (G V_r, m x r moments, n x r
projector); the two therefore keep different subspaces of the same gradient and give different
updates (and different state sizes) whenever rank < min(m, n). optax also leaves singular-vector
signs to the SVD routine, and batches nothing (stacked layers must be described by dimension
numbers there).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from parallel.sharding import is_axes, path_name

PROJ_TYPES = ("std", "left", "right", "full")
BATCH_AXES = ("layers", "sublayers", "experts")  # batched: one matrix (and one SVD) per index
RANK_AXIS = "lora"  # the logical axis of a projected dimension (replicated by DEFAULT_RULES)
OVERSAMPLE, POWER_ITERS = 8, 2  # randomized SVD


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one parameter is seen as a batch of matrices and projected.

    ``perm`` orders its dimensions as (batch..., rows..., cols...); the matrix is M = prod(rows)
    by N = prod(cols). ``side``: 'left' (P^T G), 'right' (G Q) or 'both' (P^T G Q).
    ``names``: the logical names (batch..., rows' first, cols' first)."""
    perm: tuple
    batch: tuple
    rows: tuple
    cols: tuple
    side: str
    rank: int
    names: tuple

    @property
    def m(self) -> int:
        return math.prod(self.rows)

    @property
    def n(self) -> int:
        return math.prod(self.cols)

    @property
    def left(self) -> bool:
        return self.side in ("left", "both")

    @property
    def right(self) -> bool:
        return self.side in ("right", "both")

    def low_shape(self) -> tuple:
        """The projected gradient's shape: batch + (r or M, r or N)."""
        return self.batch + (self.rank if self.left else self.m, self.rank if self.right else self.n)

    def low_axes(self) -> tuple:
        *b, row, col = self.names
        return (*b, RANK_AXIS if self.left else row, RANK_AXIS if self.right else col)

    def projector_shapes(self) -> dict:
        """'left': batch + (M, r); 'right': batch + (N, r)."""
        out = {}
        if self.left:
            out["left"] = self.batch + (self.m, self.rank)
        if self.right:
            out["right"] = self.batch + (self.n, self.rank)
        return out

    def projector_axes(self) -> dict:
        *b, row, col = self.names
        return {k: (*b, row if k == "left" else col, RANK_AXIS) for k in self.projector_shapes()}


def matrix_dims(axes: tuple) -> tuple[list, list, list] | None:
    """(batch, rows, cols) dimension indices of a parameter with logical ``axes``, or None when it is
    not a matrix (fewer than two dimensions besides the batch axes)."""
    batch = [i for i, a in enumerate(axes) if a in BATCH_AXES]
    own = [i for i, a in enumerate(axes) if a not in BATCH_AXES]
    if len(own) < 2:
        return None
    names = [axes[i] for i in own]
    if "embed" in names[1:] and names[-1] == "embed":
        return batch, own[:-1], own[-1:]
    return batch, own[:1], own[1:]


def default_selection(axes: tuple) -> bool:
    """The paper's choice: the projection matrices of attention and MLP (every dimension named, none of
    them ``vocab`` (embedding, LM head) or ``state`` (Mamba's A)); norms, biases, embeddings and small
    unnamed matrices (Mamba's conv, x_proj, dt_proj; the MoE router) are not projected."""
    return (matrix_dims(axes) is not None and None not in axes
            and not {"vocab", "state"} & set(axes))


def select(param_axes, pattern: str = "") -> Any:
    """True for the parameters to project: ``default_selection`` for '', else those whose path
    ('layers/wq') ``re.fullmatch``es ``pattern``. ValueError when the pattern matches no parameter or a
    parameter that is not a matrix. None leaves (frozen parameters) stay None."""
    if not pattern:
        return jax.tree.map(default_selection, param_axes, is_leaf=is_axes)
    regex = re.compile(pattern)
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_axes)
    chosen = []
    for path, axes in flat:
        hit = bool(regex.fullmatch(path_name(path)))
        if hit and matrix_dims(axes) is None:
            raise ValueError(f"galore selection {pattern!r} matches {path_name(path)} (axes {axes}), which is not "
                             f"a matrix; select only weights with two dimensions besides {BATCH_AXES}.")
        chosen.append(hit)
    if not any(chosen):
        names = [path_name(p) for p, _ in flat]
        raise ValueError(f"galore selection (optim.galore_select) {pattern!r} matches no parameter; paths look like {names[:4]} "
                         f"(re.fullmatch).")
    return treedef.unflatten(chosen)


def layout(shape: tuple, axes: tuple, rank: int, proj_type: str, name: str = "") -> Layout:
    """The Layout of a selected parameter; ValueError when ``rank`` exceeds the matrix's smaller side."""
    batch, rows, cols = matrix_dims(axes)
    m, n = math.prod(shape[i] for i in rows), math.prod(shape[i] for i in cols)
    if rank > min(m, n):
        raise ValueError(f"galore rank {rank} (optim.galore_rank) exceeds the smaller side of {name or 'a parameter'} "
                         f"({m} x {n} as a matrix, shape {tuple(shape)}); lower the rank to at most {min(m, n)} "
                         f"or leave this parameter out of the selection.")
    side = {"std": "right" if m >= n else "left", "left": "left", "right": "right", "full": "both"}[proj_type]
    return Layout(perm=tuple(batch + rows + cols), batch=tuple(shape[i] for i in batch),
                  rows=tuple(shape[i] for i in rows), cols=tuple(shape[i] for i in cols), side=side, rank=rank,
                  names=tuple(axes[i] for i in batch) + (axes[rows[0]], axes[cols[0]]))


@flax.struct.dataclass
class GaLoreState:
    """count: int32 [], updates so far. projectors: per parameter leaf (flattened order) a dict
    {'left': [batch..., M, r], 'right': [batch..., N, r]} (float32) or None where not projected.
    inner_state: the inner transformation's state over the projected gradients (parameters'
    structure, selected leaves of ``Layout.low_shape``). layouts: static, per leaf a Layout or None."""
    count: jax.Array
    projectors: tuple
    inner_state: Any
    layouts: tuple = flax.struct.field(pytree_node=False)


def _to_matrix(g, lay: Layout):
    return jnp.transpose(g, lay.perm).reshape(lay.batch + (lay.m, lay.n))


def _from_matrix(x, lay: Layout, shape: tuple):
    x = x.reshape(lay.batch + lay.rows + lay.cols)
    return jnp.transpose(x, tuple(sorted(range(len(shape)), key=lambda i: lay.perm[i])))


def _fix_signs(vectors):
    """[..., k, r] with each column's largest-magnitude entry made positive."""
    idx = jnp.argmax(jnp.abs(vectors), axis=-2, keepdims=True)
    sign = jnp.sign(jnp.take_along_axis(vectors, idx, axis=-2))
    return vectors * jnp.where(sign == 0, 1.0, sign)


def _gram_vectors(g, rank: int, side: str):
    """The top-``rank`` singular vectors of one side of a float32 batch of matrices, as the top
    eigenvectors of its Gram matrix (G G^T for U, G^T G for V; eigenvalues sigma^2): one symmetric
    eigensolve of the side's size instead of a full SVD of G (on an H200 the batched SVD of the
    1.26B config's gradients takes ~50 s, the Gram eigensolves a fraction of a second). Accurate
    for the vectors whose sigma_i^2 stands above float32 rounding of sigma_1^2, i.e. the leading
    ones GaLore keeps."""
    gt = jnp.swapaxes(g, -1, -2)
    gram = jnp.matmul(g, gt, precision="highest") if side == "left" else jnp.matmul(gt, g, precision="highest")
    _, vectors = jnp.linalg.eigh(gram)  # ascending eigenvalues
    return _fix_signs(vectors[..., ::-1][..., :rank])


def _randomized(g, rank: int, key):
    """(U[..., :, :r], V[..., :, :r]) by a randomized range finder, signs fixed."""
    k = min(rank + OVERSAMPLE, *g.shape[-2:])
    omega = jax.random.normal(key, g.shape[:-2] + (g.shape[-1], k), g.dtype)
    q, _ = jnp.linalg.qr(g @ omega)
    for _ in range(POWER_ITERS):
        q, _ = jnp.linalg.qr(jnp.swapaxes(g, -1, -2) @ q)
        q, _ = jnp.linalg.qr(g @ q)
    ub, _, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ g, full_matrices=False)
    return _fix_signs((q @ ub)[..., :rank]), _fix_signs(jnp.swapaxes(vh, -1, -2)[..., :rank])


def projectors_of(g, lay: Layout, randomized: bool = False, key=None) -> dict:
    """The projectors of one gradient (any dtype; computed in float32): U_r ("left") and/or V_r
    ("right") of G = U S V^T, each singular vector's sign fixed."""
    g = _to_matrix(g, lay).astype(jnp.float32)
    sides = lay.projector_shapes()
    if randomized:
        u, v = _randomized(g, lay.rank, key)
        return {k: x for k, x in (("left", u), ("right", v)) if k in sides}
    return {k: _gram_vectors(g, lay.rank, k) for k in sides}


def project(g, proj: dict, lay: Layout):
    """R = P^T G, G Q or P^T G Q: [batch..., low_shape]."""
    x = _to_matrix(g, lay)
    if lay.left:
        x = jnp.einsum("...mr,...mn->...rn", proj["left"].astype(x.dtype), x)
    if lay.right:
        x = jnp.einsum("...mn,...nr->...mr", x, proj["right"].astype(x.dtype))
    return x


def project_back(x, proj: dict, lay: Layout, shape: tuple):
    """P N, N Q^T or P N Q^T, in the parameter's shape."""
    if lay.left:
        x = jnp.einsum("...mr,...rn->...mn", proj["left"].astype(x.dtype), x)
    if lay.right:
        x = jnp.einsum("...mr,...nr->...mn", x, proj["right"].astype(x.dtype))
    return _from_matrix(x, lay, shape)


class _Config(NamedTuple):
    rank: int
    gap: int
    scale: float
    proj_type: str
    randomized_svd: bool
    seed: int


def galore(inner: optax.GradientTransformation, param_axes, rank: int, update_proj_gap: int = 200,
           scale: float = 0.25, proj_type: str = "std", selection: Any = None, randomized_svd: bool = False,
           seed: int = 0) -> optax.GradientTransformation:
    """GaLore around ``inner`` (a gradient-scaling optax transformation; see the module docstring).

    param_axes: the logical axes of the parameters (None at leaves without a parameter).
    selection: a tree of bools like ``param_axes`` (``select``), default ``select(param_axes)``.
    rank: r; update_proj_gap: steps between SVDs (>= 1); scale: alpha, multiplying the update.
    Raises ValueError for a bad rank, gap or projection type here, and for a rank above a selected
    matrix's smaller side at ``init``.
    """
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"galore proj_type is {proj_type!r}; use one of {PROJ_TYPES}.")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"galore rank is {rank!r}; use a positive integer.")
    if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(f"galore update_proj_gap is {update_proj_gap!r}; use a positive number of steps.")
    cfg = _Config(rank, update_proj_gap, scale, proj_type, randomized_svd, seed)
    if selection is None:
        selection = select(param_axes)

    def layouts_of(params):
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        axes = jax.tree.leaves(param_axes, is_leaf=is_axes)
        chosen = jax.tree.leaves(selection)
        if not (len(flat) == len(axes) == len(chosen)):
            raise ValueError("galore: param_axes and selection must have the parameters' structure.")
        return tuple(layout(tuple(p.shape), a, cfg.rank, cfg.proj_type, path_name(path)) if s else None
                     for (path, p), a, s in zip(flat, axes, chosen))

    def init(params):
        layouts = layouts_of(params)
        leaves, treedef = jax.tree.flatten(params)
        proxies = [jnp.zeros(lay.low_shape(), p.dtype) if lay else p for p, lay in zip(leaves, layouts)]
        projectors = tuple({k: jnp.zeros(s, jnp.float32) for k, s in lay.projector_shapes().items()} if lay else None
                           for lay in layouts)
        return GaLoreState(count=jnp.zeros([], jnp.int32), projectors=projectors,
                           inner_state=inner.init(treedef.unflatten(proxies)), layouts=layouts)

    def refresh(leaves, layouts, count):
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), count)
        return tuple(projectors_of(g, lay, cfg.randomized_svd, jax.random.fold_in(key, i)) if lay else None
                     for i, (g, lay) in enumerate(zip(leaves, layouts)))

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        layouts = state.layouts
        projectors = jax.lax.cond(state.count % cfg.gap == 0, lambda: refresh(leaves, layouts, state.count),
                                  lambda: state.projectors)
        low = [project(g, pr, lay) if lay else g for g, pr, lay in zip(leaves, projectors, layouts)]
        low_updates, inner_state = inner.update(treedef.unflatten(low), state.inner_state, None)
        out = [(cfg.scale * project_back(u, pr, lay, g.shape)).astype(g.dtype) if lay else u
               for u, g, pr, lay in zip(jax.tree.leaves(low_updates), leaves, projectors, layouts)]
        return treedef.unflatten(out), GaLoreState(count=optax.safe_int32_increment(state.count),
                                                   projectors=projectors, inner_state=inner_state,
                                                   layouts=layouts)

    return optax.GradientTransformation(init, update)


def state_axes(state: GaLoreState, inner_axes) -> GaLoreState:
    """The logical axes of a GaLoreState: count ``()``, projectors (the matrix side's axis, then the rank
    axis), and ``inner_axes(inner_state, low_shapes, low_axes)`` for the inner state, where low_shapes
    and low_axes are per leaf (flattened order) the projected gradient's shape and axes (the
    parameter's own where not projected; the caller supplies them there)."""
    projectors = tuple(lay.projector_axes() if lay else None for lay in state.layouts)
    return GaLoreState(count=(), projectors=projectors, inner_state=inner_axes(state.inner_state, state.layouts),
                       layouts=state.layouts)
