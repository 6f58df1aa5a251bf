"""What the train step is compiled from, derived from a config and a mesh without touching a device.

The trainer, the benchmark, the TPU ahead-of-time check and ``train.evaluate`` all build their
state and step here, so they compile the same program.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

import models
from models import COMPILER_OPTIONS, lora
from parallel import pipeline, sharding
from train import objective as objective_lib, optim, step as step_lib
from train.config import base_config, validate
from train.objective import Objective


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything the train step is compiled from: model, objective, optimizer, frozen mask, shardings,
    the abstract state, the step. Built by ``setup_training`` from a config and a mesh."""
    config: Any
    model: Any                       # the model family's module (``models.get``)
    mcfg: Any                        # its config dataclass
    mesh: Mesh
    rules: tuple
    objective: Objective
    tx: optax.GradientTransformation
    frozen: Any                      # tree of bools like the parameters, or None (nothing frozen)
    init_fn: Callable                # rng -> TrainState
    state_shape: Any                 # TrainState of ShapeDtypeStruct (no shardings)
    state_axes: Any                  # TrainState of logical-axis tuples
    state_shardings: Any             # TrainState of NamedSharding
    batch_sharding: NamedSharding    # of every [batch, seq] batch array
    train_step: Callable             # (state, batch) -> (state, metrics), not jitted
    adapt: Callable | None = None    # model params -> params with train.adapters (None: no adapters)

    def state_from_params(self, params) -> Any:
        """A fresh train state (step 0, fresh optimizer state) around ``params``: the model's (``adapt`` applied
        when the run has adapters and they have none yet) or already this run's parameter structure."""
        if self.adapt is not None and jax.tree.structure(params) != jax.tree.structure(self.state_shape.params):
            params = self.adapt(params)
        return _fresh_state(self.tx, self.frozen, params)

    def abstract_state(self) -> Any:
        """The state as sharded ShapeDtypeStructs (for ``lower`` and checkpoint restore)."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.state_shape, self.state_shardings)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """A global batch as sharded ShapeDtypeStructs: int32 [batch_size, seq_len] per key the objective reads."""
        t = self.config.train
        return {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=self.batch_sharding)
                for k in self.objective.batch_keys}

    def jit_train_step(self):
        """The train step jitted with the state's and batch's shardings, the state donated."""
        return jax.jit(self.train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,),
                       compiler_options=COMPILER_OPTIONS)

    def jit_eval_step(self):
        """The objective's eval step (``step.make_eval_step``) jitted with the parameters' shardings."""
        return jax.jit(step_lib.make_eval_step(self.model, self.mcfg, self.objective),
                       in_shardings=(self.state_shardings.params, self.batch_sharding),
                       compiler_options=COMPILER_OPTIONS)


def _axis_sizes(model, mcfg, config) -> dict:
    """Logical axis -> (size, field to change) of the activation axes a mesh must divide: the model
    family's (``axis_sizes``), the (micro)batch and the sequence."""
    t, accum = config.train, config.optim.accum_steps
    sizes = {name: (size, f"model.{field}") for name, (size, field) in model.axis_sizes(mcfg).items()}
    batch_name = "train.batch_size" if accum == 1 else "train.batch_size / optim.accum_steps"
    sizes.update(batch=(t.batch_size // accum, batch_name), seq=(t.seq_len, "train.seq_len"))
    return sizes


def pipelined(model, config, mesh: Mesh, rules, params_shape) -> tuple[Any, int]:
    """(model, micro-batches): with ``mesh.stage`` > 1 the family wrapped in ``pipeline.Pipelined`` (its layer
    stack a GPipe pipeline over the stage axis, per the config's ``pipeline`` section), after checking that
    the layer units and the batch split evenly; otherwise (model, 1)."""
    stages = mesh.shape["stage"]
    if stages == 1:
        return model, 1
    p = config.pipeline if "pipeline" in config else base_config().pipeline  # configs saved before the section
    t, accum = config.train, config.optim.accum_steps
    batch_axes = [a for a in sharding._targets(dict(rules).get("batch")) if a in mesh.shape]
    units = jax.tree.leaves(params_shape["layers"])[0].shape[0]
    pipeline.check(units, t.batch_size // accum, stages=stages, microbatches=p.microbatches,
                   repeats=p.circular_repeats, batch_shards=math.prod(mesh.shape[a] for a in batch_axes),
                   units_name="the layer units of model.n_layers",
                   batch_name="train.batch_size" if accum == 1 else "train.batch_size / optim.accum_steps")
    return pipeline.Pipelined(model, stages=stages, microbatches=p.microbatches, repeats=p.circular_repeats,
                              remat=p.remat, mesh=mesh), p.microbatches


def _fresh_state(tx, frozen, params):
    """Step 0 and ``tx``'s initial state of the trainable view of ``params`` (``step.init_state``'s, given params)."""
    view = params if frozen is None else optim.trainable(params, frozen)
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(view))


ADAPTER_SALT = 0x10a  # folded into PRNGKey(seed): the adapters' initial A


def adapter_fn(config, param_axes) -> Callable | None:
    """params -> (params, axes) with ``train.adapters`` ('lora' | 'qlora', ``models.lora.qlora``) on the weights
    whose path re.fullmatches ``train.adapter_targets``; None without adapters."""
    t = config.train
    if not t.adapters:
        return None
    regex = re.compile(t.adapter_targets)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), ADAPTER_SALT)

    def adapt(params):
        try:
            return lora.qlora(params, param_axes, rng, rank=t.adapter_rank, block=t.adapter_block,
                              where=lambda path, names: len(names) >= 2 and bool(regex.fullmatch(path)),
                              quantize_base=t.adapters == "qlora")
        except ValueError as e:
            raise ValueError(f"train.adapters={t.adapters!r} with train.adapter_targets={t.adapter_targets!r}, "
                             f"train.adapter_block={t.adapter_block}: {e}") from None

    return adapt


def setup_training(config, mesh: Mesh) -> TrainSetup:
    """Validate ``config`` against ``mesh`` (fields, rules, divisibility of every array of the state and
    of the activation axes) and derive the train state's shapes, axes and shardings and the train
    step, without touching a device.

    Raises ValueError with one sentence naming the field and the fix.
    """
    mcfg = validate(config, platform=mesh.devices.flat[0].platform)
    t = config.train
    rules = tuple(tuple(r) for r in config.sharding.rules)
    sharding.validate_rules(rules, mesh)
    model = models.get(config.model.family)
    objective = objective_lib.get(t)
    param_axes = model.param_axes(mcfg)
    params_shape = jax.eval_shape(functools.partial(model.init, mcfg), jax.random.PRNGKey(config.seed))
    sharding.check_axes(params_shape, param_axes)
    adapt_axes = adapter_fn(config, param_axes)
    if adapt_axes is None:
        adapt = None
    else:  # the adapted parameters and their axes (sharding, frozen mask, optimizer state)
        adapted = []
        params_shape = jax.eval_shape(lambda p: adapted.append(adapt_axes(p)) or adapted[-1][0], params_shape)
        param_axes = adapted[-1][1]
        objective = lora.training_objective(objective)  # adapter dropout while training

        def adapt(params):
            return adapt_axes(params)[0]
    frozen_pattern = config.optim.frozen or (lora.FROZEN_ALL_BUT_ADAPTERS if adapt else "")
    frozen = optim.frozen_mask(params_shape, frozen_pattern) if frozen_pattern else None
    if frozen is not None and not any(jax.tree.leaves(frozen)):
        raise ValueError(f"optim.frozen ({config.optim.frozen!r}) matches no parameter path; paths look like "
                         f"{sharding.path_name(jax.tree_util.tree_flatten_with_path(params_shape)[0][-1][0])!r}.")
    if frozen is not None and all(jax.tree.leaves(frozen)):
        raise ValueError(f"optim.frozen ({config.optim.frozen!r}) freezes every parameter; leave some to train.")
    trainable_axes = param_axes if frozen is None else jax.tree.map(
        lambda a, f: None if f else a, param_axes, frozen, is_leaf=sharding.is_axes)
    tx = optim.make_optimizer(config.optim, t.steps, trainable_axes)
    if adapt is None:
        init_fn = functools.partial(step_lib.init_state, model, mcfg, tx, frozen=frozen)
    else:
        def init_fn(rng):  # model.init, then the adapters
            return _fresh_state(tx, frozen, adapt(model.init(mcfg, rng)))
    state_shape = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    view = state_shape.params if frozen is None else optim.trainable(state_shape.params, frozen)
    state_axes = step_lib.TrainState(step=(), params=param_axes,
                                     opt_state=optim.state_axes(state_shape.opt_state, view, trainable_axes))
    model, micro = pipelined(model, config, mesh, rules, params_shape)
    sharding.check_divisibility(state_shape, state_axes, mesh, rules, _axis_sizes(model, mcfg, config))
    model.validate_mesh(mcfg, mesh, rules, tokens=t.batch_size // config.optim.accum_steps // micro * t.seq_len)
    state_sh = sharding.state_shardings(state_axes, mesh, rules, state_shape)
    train_step = step_lib.make_train_step(model, mcfg, tx, objective, frozen=frozen,
                                          accum_steps=config.optim.accum_steps, seed=config.seed, nonfinite=t.nonfinite)
    return TrainSetup(config=config, model=model, mcfg=mcfg, mesh=mesh, rules=rules, objective=objective, tx=tx,
                      frozen=frozen, init_fn=init_fn, state_shape=state_shape, state_axes=state_axes,
                      state_shardings=state_sh, batch_sharding=sharding.batch_sharding(mesh, rules),
                      train_step=train_step, adapt=adapt)
