"""Pure training pieces: the train state, the train and eval steps of any objective.

The step functions are sharding-agnostic; the trainer jits them with the shardings that
``parallel.sharding`` derives from the state's logical axes. The objective (``train.objective``)
says what is differentiated; the optimizer and the trainable/frozen split come from
``train.optim``. The model runs in train mode in the train step (with a PRNG key from the config
seed, the step and the microbatch) and in eval mode in the eval step.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from train import optim
from train.objective import Objective


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: every parameter (frozen ones included); opt_state: the optimizer's
    state over the trainable view of the parameters (``optim.trainable``)."""
    step: jax.Array
    params: Any
    opt_state: Any


def _view(params, frozen):
    return params if frozen is None else optim.trainable(params, frozen)


def _merge(view, params, frozen):
    return view if frozen is None else optim.merge(view, params)


def init_state(model, mcfg, tx: optax.GradientTransformation, rng: jax.Array, frozen=None) -> TrainState:
    """Parameters from ``model.init`` and the optimizer state of their trainable view. ``frozen``: a tree
    of Python bools like the parameters (``optim.frozen_mask``), or None for nothing frozen."""
    params = model.init(mcfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(_view(params, frozen)))


def step_rng(seed: int, step, microbatch=0) -> jax.Array:
    """The train-mode key of a step's microbatch: ``fold_in(fold_in(PRNGKey(seed), step), microbatch)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), microbatch)


def make_grad_fn(model, mcfg, objective: Objective, frozen=None):
    """grad_fn(params, batch, rng) -> (Loss, gradients of Loss.total over the trainable view), the model
    in train mode with ``rng``. Frozen leaves are constants: no gradient is computed for them."""
    def grad_fn(params, batch, rng):
        def total(view):
            out = objective.loss(model, mcfg, _merge(view, params, frozen), batch, train=True, rng=rng)
            return out.total, out
        (_, out), grads = jax.value_and_grad(total, has_aux=True)(_view(params, frozen))
        return out, grads

    return grad_fn


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads, frozen=None) -> TrainState:
    """One optimizer update of ``state``'s trainable parameters from ``grads`` (the trainable view's
    gradients); step + 1. The state keeps its dtypes: bf16 parameters keep bf16 moments even where
    optax promotes them."""
    view = _view(state.params, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, view)
    opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
    step = state.step + 1
    return TrainState(step=step, params=_merge(optax.apply_updates(view, updates), state.params, frozen),
                      opt_state=opt_state)


def make_train_step(model, mcfg, tx, objective: Objective, *, frozen=None, accum_steps: int = 1, seed: int = 0,
                    nonfinite: str = "stop"):
    """train_step(state, batch) -> (state, metrics); gradients summed over ``accum_steps`` microbatches.

    The loss is the objective's summed loss over the whole batch divided by its summed weight
    (tokens, pairs), so a step with accumulation equals the same step on the full batch (with MoE,
    up to routing: groups and capacity are per microbatch). Microbatch i takes rows i, i + accum,
    ... and the key ``step_rng(seed, step, i)``. Metrics: each of the objective's sums divided by
    the weight ("loss": the task loss alone), the weight (``objective.weight_name``), grad_norm,
    and the model's aux losses and metrics (``Loss.means``) averaged over microbatches.

    ``nonfinite="skip"``: a step whose loss or gradient norm is not finite leaves the parameters and
    optimizer state as they were (the step counter still advances) and reports ``skipped`` = 1. Under
    "stop" (the default) the program has no such select; the trainer stops on the metrics instead.
    """
    grad_fn = make_grad_fn(model, mcfg, objective, frozen)

    def train_step(state: TrainState, batch: dict):
        if accum_steps == 1:
            out, grads = grad_fn(state.params, batch, step_rng(seed, state.step))
            weight, sums, means = out.weight, out.sums, out.means
        else:
            micro = jax.tree.map(lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

            def one(mb, i):
                out, grads = grad_fn(state.params, mb, step_rng(seed, state.step, i))
                return (out.weight, out.sums, grads), out.means

            def body(carry, xs):
                summed, logged = one(*xs)
                return jax.tree.map(jnp.add, carry, summed), logged

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(one, first, jnp.zeros((), jnp.int32))[0])
            (weight, sums, grads), logged = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
            means = jax.tree.map(lambda a: jnp.mean(a, axis=0), logged)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        metrics = {**{k: v / denom for k, v in sums.items()}, "grad_norm": optax.tree.norm(grads),
                   objective.weight_name: weight, **means}
        new = apply_gradients(tx, state, grads, frozen)
        if nonfinite == "skip":
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            new = new.replace(params=jax.tree.map(lambda n, o: jnp.where(ok, n, o), new.params, state.params),
                              opt_state=jax.tree.map(lambda n, o: jnp.where(ok, n, o), new.opt_state,
                                                     state.opt_state))
            metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        return new, metrics

    return train_step


def make_eval_step(model, mcfg, objective: Objective):
    """eval_step(params, batch) -> {'weight', 'sums', 'means'} of the objective in eval mode (summed;
    ``train.evaluate.eval_metrics`` divides by the total weight over batches)."""
    def eval_step(params, batch):
        out = objective.loss(model, mcfg, params, batch)
        return {"weight": out.weight, "sums": out.sums, "means": out.means}

    return eval_step
