"""What the train step is compiled from, derived from a config and a mesh without touching a device.

The trainer, the benchmark and the TPU ahead-of-time check all build their state and step here,
so the three compile the same program.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

import models
from parallel import sharding
from train import data, step as step_lib
from train.config import validate


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything the train step is compiled from: model, shardings, the abstract state, the step.

    Built by ``setup_training`` from a config and a mesh; the trainer and this tool use the same one.
    """
    config: Any
    model: Any                       # the model family's module (``models.get``)
    mcfg: Any                        # its config dataclass
    mesh: Mesh
    rules: tuple
    tx: optax.GradientTransformation
    init_fn: Callable                # rng -> TrainState
    state_shape: Any                 # TrainState of ShapeDtypeStruct (no shardings)
    state_shardings: Any             # TrainState of NamedSharding
    batch_sharding: NamedSharding    # of every [batch, seq] batch array
    train_step: Callable             # (state, batch) -> (state, metrics), not jitted

    def abstract_state(self) -> Any:
        """The state as sharded ShapeDtypeStructs (for ``lower`` and checkpoint restore)."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.state_shape, self.state_shardings)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """A global batch as sharded ShapeDtypeStructs: int32 [batch_size, seq_len] per key of ``data.BATCH_KEYS``."""
        t = self.config.train
        return {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=self.batch_sharding)
                for k in data.BATCH_KEYS}

    def jit_train_step(self):
        """The train step jitted with the state's and batch's shardings, the state donated."""
        return jax.jit(self.train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,))


def setup_training(config, mesh: Mesh) -> TrainSetup:
    """Validate ``config`` against ``mesh`` (fields, rules, divisibility) and derive the train state's
    shapes and shardings and the train step, without touching a device.

    Raises ValueError with one sentence naming the field and the fix.
    """
    mcfg = validate(config)
    t = config.train
    rules = tuple(tuple(r) for r in config.sharding.rules)
    sharding.validate_rules(rules, mesh)
    sharding.check_divisibility(mcfg, mesh, rules, t.batch_size, seq_len=t.seq_len,
                                accum_steps=config.optim.accum_steps)
    model = models.get(config.model.family)
    if hasattr(model, "validate_mesh"):  # MoE: routing groups over the devices, experts over their axis
        model.validate_mesh(mcfg, mesh, rules, tokens=t.batch_size // config.optim.accum_steps * t.seq_len)
    tx = step_lib.make_optimizer(config.optim, t.steps, model.param_axes(mcfg))
    init_fn = functools.partial(step_lib.init_state, model, mcfg, tx)
    state_shape = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    state_sh = sharding.state_shardings(state_shape, model.param_axes(mcfg), mesh, rules, tx)
    train_step = step_lib.make_train_step(model, mcfg, tx, objective=t.objective,
                                          accum_steps=config.optim.accum_steps, loss_chunk=t.loss_chunk,
                                          seed=config.seed)
    return TrainSetup(config=config, model=model, mcfg=mcfg, mesh=mesh, rules=rules, tx=tx, init_fn=init_fn,
                      state_shape=state_shape, state_shardings=state_sh,
                      batch_sharding=sharding.batch_sharding(mesh, rules), train_step=train_step)
