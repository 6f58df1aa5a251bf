"""Optimizers by name, the trainable/frozen split of the parameters, and the logical axes of optimizer state.

``config.optim.name`` picks an entry of ``OPTIMIZERS`` (adamw, adafactor, lion, sgd; all optax; and
galore, train/galore.py, around the gradient-scaling part of one of them),
each on the same schedule (``make_schedule``), global-norm clipping and weight-decay mask
(``decay_mask``: by logical axes). ``config.optim.frozen`` is a regular expression over parameter
paths ('layers/wq', 'embed'; ``re.fullmatch``): matching leaves are frozen. The optimizer sees only
the trainable view of the parameters (``trainable``: frozen leaves replaced by None, so they have
no gradient, no optimizer state and no weight decay); the train state keeps every parameter, so
frozen ones are checkpointed and sharded like the rest. With nothing frozen the view is the
parameter tree itself.

Every optimizer also says the logical axes of its state (``state_axes``), so its shardings come
from the parameters' axes: moments that mirror the parameters (Adam's mu and nu, Lion's and
SGD's momentum) take their axes, Adafactor's factored moments the parameter's axes without the
reduced dimension (Shazeer & Stern 2018, eq. 5: row and column sums of the squared gradient),
counts ``()``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np
import optax
from optax._src.factorized import FactoredState

from parallel.sharding import is_axes, path_name
from train import galore

MIN_DIM_SIZE_TO_FACTOR = 128  # Adafactor factors the two largest dimensions when both are at least this


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``end_lr_ratio * lr`` at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
        decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.lr * optim_cfg.end_lr_ratio)


STACKING = ("layers", "sublayers")


def decay_mask(param_axes) -> Any:
    """True for the parameters weight decay applies to: matrices (two or more dimensions, named or not,
    besides the stacking axes ``layers`` and ``sublayers``), except the state matrix A_log (axis
    ``state``), which Gu & Dao exclude along with D. Norm scales, biases, D and dt_bias, stacked
    over layers or not, are not decayed. None in place of a leaf (a frozen parameter) stays None."""
    def decays(axes):
        own = [a for a in axes if a not in STACKING]
        return len(own) >= 2 and "state" not in own
    return jax.tree.map(decays, param_axes, is_leaf=is_axes)


# ----------------------------------------------------------------------------- trainable / frozen

def frozen_mask(params, pattern: str) -> Any:
    """True for the leaves of ``params`` (arrays or shapes) whose path ('layers/wq') ``re.fullmatch``es
    ``pattern``; all False for ''."""
    regex = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(regex is not None and regex.fullmatch(path_name(path))), params)


def trainable(params, frozen) -> Any:
    """The trainable view: ``params`` with frozen leaves replaced by None (no leaf there)."""
    return jax.tree.map(lambda p, f: None if f else p, params, frozen)


def merge(view, params) -> Any:
    """``params`` with the leaves of the trainable ``view`` put in (the inverse of ``trainable``)."""
    return jax.tree.map(lambda v, p: p if v is None else v, view, params, is_leaf=lambda x: x is None)


# ----------------------------------------------------------------------------- optimizers

@dataclasses.dataclass(frozen=True)
class Optimizer:
    """make(optim_cfg, schedule, decay_mask) -> optax transformation (clipping is added around it);
    with ``axes``, make(optim_cfg, schedule, decay_mask, param_axes)."""
    make: Callable[..., optax.GradientTransformation]
    axes: bool = False


def _adamw(o, schedule, mask):
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)


def _adafactor(o, schedule, mask):
    return optax.adafactor(schedule, min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR, decay_rate=o.decay_rate,
                           clipping_threshold=None, momentum=None, eps=o.eps,
                           weight_decay_rate=o.weight_decay or None, weight_decay_mask=mask,
                           multiply_by_parameter_scale=False)


def _lion(o, schedule, mask):
    return optax.lion(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)


def _sgd(o, schedule, mask):
    return optax.chain(optax.add_decayed_weights(o.weight_decay, mask),
                       optax.sgd(schedule, momentum=o.momentum or None))


# The gradient-scaling part of each optimizer, for GaLore to run on projected gradients.
GALORE_INNER: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "adamw": lambda o: optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
    "lion": lambda o: optax.scale_by_lion(b1=o.b1, b2=o.b2),
    "adafactor": lambda o: optax.scale_by_factored_rms(decay_rate=o.decay_rate, epsilon=o.eps,
                                                       min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR),
    "sgd": lambda o: optax.trace(decay=o.momentum) if o.momentum else optax.identity(),
}


def _galore(o, schedule, mask, param_axes):
    """GaLore (train/galore.py) around ``GALORE_INNER[o.galore_inner]``; decoupled weight decay on the full
    weights (``mask``), then the learning rate: W -= lr * (scale * P N(P^T G) + wd * W)."""
    inner = GALORE_INNER[o.galore_inner](o)
    tx = galore.galore(inner, param_axes, rank=o.galore_rank, update_proj_gap=o.galore_gap, scale=o.galore_scale,
                       proj_type=o.galore_proj, selection=galore.select(param_axes, o.galore_select),
                       randomized_svd=o.galore_randomized_svd)
    return optax.chain(tx, optax.add_decayed_weights(o.weight_decay, mask), optax.scale_by_learning_rate(schedule))


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer(_adamw), "adafactor": Optimizer(_adafactor), "lion": Optimizer(_lion), "sgd": Optimizer(_sgd),
    "galore": Optimizer(_galore, axes=True),
}


def make_optimizer(optim_cfg, total_steps: int, param_axes) -> optax.GradientTransformation:
    """``OPTIMIZERS[optim_cfg.name]`` on ``make_schedule`` with global-norm clipping (``clip_norm`` > 0),
    weight decay where ``decay_mask(param_axes)``; ``param_axes`` is that of the trainable view (None
    at frozen leaves)."""
    schedule = make_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    opt = OPTIMIZERS[optim_cfg.name]
    parts.append(opt.make(optim_cfg, schedule, decay_mask(param_axes), *((param_axes,) if opt.axes else ())))
    return optax.chain(*parts)


def _factored_dims(shape) -> tuple[int, int] | None:
    """(d1, d0): the dimensions Adafactor reduces for its column and row moments (as optax decides), or None."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < MIN_DIM_SIZE_TO_FACTOR:
        return None
    return int(order[-2]), int(order[-1])


def _drop(axes: tuple, dim: int) -> tuple:
    return axes[:dim] + axes[dim + 1:]


def state_axes(opt_state, params, param_axes) -> Any:
    """The logical axes of ``opt_state`` (arrays or ShapeDtypeStructs), leaf by leaf.

    ``params``/``param_axes``: the trainable view the optimizer was initialised on, and its axes.
    A subtree with the parameters' structure takes their axes; Adafactor's factored moments take
    the parameter's axes without the reduced dimension (``v_row`` drops d0, ``v_col`` d1, and the
    unused [1] placeholders get ``(None,)``); scalars get ``()``; GaLore's state (``galore.state_axes``)
    the projectors' axes and, for its inner state, these rules applied to the projected shapes and axes.
    Any other leaf is an error naming it.
    """
    structure = jax.tree.structure(params)
    shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]
    return _state_axes(opt_state, structure, shapes, jax.tree.leaves(param_axes, is_leaf=is_axes))


def _state_axes(opt_state, structure, shapes, axes) -> Any:
    """``state_axes`` for parameters of treedef ``structure`` with leaves' ``shapes`` and ``axes``."""

    def factored(state: FactoredState):
        rows, cols, full = [], [], []
        for p, a in zip(shapes, axes):
            dims = _factored_dims(p)
            rows.append(_drop(a, dims[1]) if dims else (None,))
            cols.append(_drop(a, dims[0]) if dims else (None,))
            full.append((None,) if dims else a)
        return FactoredState(count=(), v_row=structure.unflatten(rows), v_col=structure.unflatten(cols),
                             v=structure.unflatten(full))

    def walk(path, node):
        if isinstance(node, FactoredState):
            return factored(node)
        if isinstance(node, galore.GaLoreState):
            return galore.state_axes(node, lambda inner, layouts: _state_axes(
                inner, structure, [lay.low_shape() if lay else s for s, lay in zip(shapes, layouts)],
                [lay.low_axes() if lay else a for a, lay in zip(axes, layouts)]))
        if jax.tree.structure(node) == structure:
            return structure.unflatten(axes)
        children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
        if treedef.num_leaves == 1 and children and children[0][1] is node:  # an array
            if len(node.shape) == 0:
                return ()
            raise ValueError(f"optimizer state leaf {jax.tree_util.keystr(path)} of shape {tuple(node.shape)} "
                             f"mirrors no parameter; give its optimizer a state_axes rule.")
        return treedef.unflatten([walk(path + p, child) for p, child in children])

    return walk((), opt_state)
