"""A few sharded training steps of a tiny Transformer; shared by tests/test_parallel.py and run as a worker.

As a script it is one process of a multi-process run (the parent sets XLA_FLAGS, JAX_PLATFORMS
and, for processes configured through the environment, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID)::

    python tests/parallel_worker.py DISTRIBUTED_JSON MESH_JSON OUT_JSON

It joins the run through ``initialize_distributed`` (config section DISTRIBUTED_JSON, possibly
empty), builds the mesh, feeds only its own rows of the global batch and writes
{"losses": [...], "generated", "n_devices", "n_local", "rows"} to OUT_JSON ("generated": greedy
continuations of ``PROMPTS`` by the trained model, decoded on the same mesh).
"""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from models import transformer as T  # noqa: E402
from parallel import mesh as pmesh  # noqa: E402
from parallel import sharding  # noqa: E402
from parallel.sharding import DEFAULT_RULES  # noqa: E402
from tests.helpers import FAST_COMPILE  # noqa: E402
from train import objective, optim  # noqa: E402
from train import step as tstep  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS = 8, 16, 3
PROMPTS = [[5, 9, 2], [7, 1], [3, 3, 3, 4], [11]]


def tiny_config(n_kv_heads: int = 2) -> T.Config:
    return T.Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64,
                    dtype="float32", attention="xla")


def optimizer(mcfg: T.Config, name: str = "adamw"):
    cfg = ml_collections.ConfigDict(dict(name=name, lr=1e-2, warmup_steps=0, end_lr_ratio=0.1, weight_decay=0.1,
                                         b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, momentum=0.9, decay_rate=0.8))
    return optim.make_optimizer(cfg, STEPS, T.param_axes(mcfg))


def state_axes(mcfg: T.Config, tx, state_shape):
    """The TrainState of logical axes: parameters', the optimizer state's (``optim.state_axes``), ``()``."""
    axes = T.param_axes(mcfg)
    return tstep.TrainState(step=(), params=axes, opt_state=optim.state_axes(state_shape.opt_state,
                                                                             state_shape.params, axes))


def make_batches(vocab: int = 64, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """STEPS fixed batches, each name -> [GLOBAL_BATCH, SEQ]: two packed documents per row and padding.

    Row r holds a document of length 6 + r, then one filling the row up to 2 padding tokens.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(STEPS):
        tokens = rng.integers(0, vocab, (GLOBAL_BATCH, SEQ + 1), dtype=np.int32)
        seg = np.zeros((GLOBAL_BATCH, SEQ), np.int32)
        pos = np.zeros((GLOBAL_BATCH, SEQ), np.int32)
        for r in range(GLOBAL_BATCH):
            first = 6 + r % (SEQ - 8)
            seg[r, :first], seg[r, first:SEQ - 2] = 1, 2
            pos[r, :first], pos[r, first:SEQ - 2] = np.arange(first), np.arange(SEQ - 2 - first)
        batches.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg, positions=pos,
                            loss_mask=(seg > 0).astype(np.int32)))
    return batches


def train_losses(mesh, mcfg: T.Config, rules=DEFAULT_RULES, seed: int = 0, optimizer_name: str = "adamw"):
    """Initialise sharded, run STEPS train steps on ``make_batches`` (this process's rows only).

    Returns (losses: list of STEPS floats, final TrainState, its shardings, its logical axes).
    """
    tx = optimizer(mcfg, optimizer_name)
    sharding.validate_rules(rules, mesh)
    init = lambda: tstep.init_state(T, mcfg, tx, jax.random.PRNGKey(seed))  # noqa: E731
    shape = jax.eval_shape(init)
    axes = state_axes(mcfg, tx, shape)
    sharding.check_divisibility(shape, axes, mesh, rules, {"batch": (GLOBAL_BATCH, "batch"), "seq": (SEQ, "seq")})
    state_sh = sharding.state_shardings(axes, mesh, rules, shape)
    batch_sh = {k: sharding.batch_sharding(mesh, rules) for k in make_batches()[0]}
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = sharding.process_batch_rows(mesh, rules, GLOBAL_BATCH)
    with sharding.activate(mesh, rules):
        state = jax.jit(init, out_shardings=state_sh, compiler_options=FAST_COMPILE)()
        step = jax.jit(tstep.make_train_step(T, mcfg, tx, objective.lm_objective()),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=0,
                       compiler_options=FAST_COMPILE)
        losses = []
        for batch in make_batches(mcfg.vocab_size):
            state, metrics = step(state, sharding.global_batch({k: v[rows] for k, v in batch.items()}, mesh, rules))
            losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    return losses, state, state_sh, axes


def generate_greedy(mesh, params, mcfg: T.Config, rules=DEFAULT_RULES) -> list[list[int]]:
    """Greedy continuations (4 tokens) of ``PROMPTS`` with the mesh active (rows sharded over its batch axes)."""
    from models import generate

    with sharding.activate(mesh, rules):
        return generate.greedy(T, params, mcfg, PROMPTS, max_new_tokens=4)


def main(dist_json: str, mesh_json: str, out_json: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default; cross-process CPU collectives
    assert pmesh.initialize_distributed(json.loads(dist_json)), "no coordinator in the config or environment"
    mesh = pmesh.make_mesh(json.loads(mesh_json))
    losses, state, _, _ = train_losses(mesh, tiny_config())
    generated = generate_greedy(mesh, state.params, tiny_config())
    rows = sharding.process_batch_rows(mesh, DEFAULT_RULES, GLOBAL_BATCH)
    with open(out_json, "w") as f:
        json.dump({"losses": losses, "generated": generated, "n_devices": jax.device_count(), "n_local": jax.local_device_count(),
                   "rows": [rows.start, rows.stop]}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
