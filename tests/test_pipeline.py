"""GPipe (parallel/pipeline.py): the pipelined loss and every gradient equal the sequential model's.

On the 8 CPU devices of conftest: the stage axis in one mesh with FSDP, data and tensor axes, and
Switch with its experts over the expert axis; K in {2, 4}; the circular schedule; every model family
(Transformer, Switch MoE, Mamba); float32.
The reference is the same objective on the unpipelined model, unsharded.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from parallel import mesh as mesh_lib
from parallel import pipeline as pl
from parallel import sharding
from tests.helpers import jit, random_params, rel_err, tiny, tiny_train_config, tokens
from train import objective
from train.setup import setup_training

B, S = 8, 16  # Switch's routing groups (8 tokens) lie inside rows, so micro-batching keeps them
OBJ = objective.lm_objective(loss_chunk=0)
# Per-micro-batch load statistics (load_min/max/entropy) are not linear in the batch; the rest are.
LINEAR = ("moe/loss", "moe/aux_loss", "moe/z_loss", "moe/dropped_fraction")


def _loss_and_grads(model, cfg, params, batch):
    def total(p):
        out = OBJ.loss(model, cfg, p, batch, train=True, rng=jax.random.PRNGKey(3))
        return out.total, out
    return jit(jax.value_and_grad(total, has_aux=True))(params)


@pytest.fixture(scope="module", params=["transformer", "switch", "mamba"])
def family(request):
    """(name, cfg, model, params, batch, reference (loss, Loss), grads)."""
    name = request.param
    cfg = tiny(name, n_layers={"transformer": 4, "switch": 4, "mamba": 2}[name])
    model = models.get("mamba" if name == "mamba" else "transformer")
    params = random_params(cfg)
    t = tokens(cfg.vocab_size, B, S + 1)
    batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": (t[:, 1:] % 7 != 0).astype(jnp.int32)}
    return name, cfg, model, params, batch, _loss_and_grads(model, cfg, params, batch)


# family -> [(mesh, microbatches M, circular repeats V)]: K = 2 and 4, other axes beside the stage axis.
CASES = {
    "transformer": [({"stage": 4, "fsdp": 2}, 2, 1), ({"stage": 2, "tensor": 2, "data": 2}, 4, 2)],
    "switch": [({"stage": 2, "expert": 2, "data": 2}, 2, 1)],
    "mamba": [({"stage": 2, "data": 4}, 2, 1)],
}


def test_pipeline_equals_sequential(family):
    name, cfg, model, params, batch, ((loss0, out0), grads0) = family
    for mesh_cfg, m, v in CASES[name]:
        mesh = mesh_lib.make_mesh(mesh_cfg)
        piped = pl.Pipelined(model, stages=mesh_cfg["stage"], microbatches=m, repeats=v, mesh=mesh)
        with sharding.activate(mesh, sharding.DEFAULT_RULES):
            (loss, out), grads = _loss_and_grads(piped, cfg, params, batch)
        where = f"{name} {mesh_cfg} M={m} V={v}"
        np.testing.assert_allclose(loss, loss0, rtol=1e-5, err_msg=where)
        np.testing.assert_allclose(out.weight, out0.weight, rtol=0, err_msg=where)
        errs = jax.tree_util.tree_flatten_with_path(jax.tree.map(rel_err, grads, grads0))[0]
        worst = max(errs, key=lambda e: e[1])
        assert worst[1] < 1e-5, f"{where}: gradient {jax.tree_util.keystr(worst[0])} rel. err {worst[1]:.2e}"
        assert set(out.means) == set(out0.means), where
        for key in out0.means:
            if key.startswith(LINEAR):
                np.testing.assert_allclose(out.means[key], out0.means[key], rtol=1e-5, err_msg=f"{where} {key}")
        if name == "switch":
            assert any(k.endswith("layer3") for k in out.means)  # the second stage's MoE layer, globally named


def test_schedule_counts_each_microbatch_once():
    """A toy stage (x -> x * w_j + stage index, aux 1 per call) on each schedule: the outputs are
    the sequential composition, extras travel with their micro-batch and bubble ticks are not counted."""
    K, V, M = 2, 2, 3
    w = jnp.arange(1.0, K * V + 1.0)[:, None]  # one unit per virtual stage
    x = jnp.arange(M * 4, dtype=jnp.float32).reshape(M, 4)
    tag = jnp.arange(M, dtype=jnp.float32)

    def stage_fn(p, xi, ei, j):
        return xi * p[0] + j + ei, {"calls": jnp.float32(1.0)}

    mesh = mesh_lib.make_mesh({"stage": K, "data": -1})
    for v, remat in ((1, "none"), (V, "full")):
        ws = w[: K * v]
        y, aux = jax.jit(lambda ws, x: pl.pipeline(stage_fn, ws, x, tag, stages=K, repeats=v, remat=remat,
                                                   mesh=mesh))(ws, x)
        ref = np.asarray(x)
        for j in range(K * v):
            ref = ref * float(ws[j, 0]) + j + np.asarray(tag)[:, None]
        np.testing.assert_allclose(y, ref, rtol=1e-6)
        np.testing.assert_array_equal(aux["calls"], np.full(K * v, M))
    assert pl.bubble_fraction(4, 8) == 3 / 11 and pl.bubble_fraction(4, 8, 2) == 3 / 19


def _config(**changes):
    c = tiny_train_config(batch_size=8, seq_len=16)
    c.model.n_layers = 4
    c.mesh.update(stage=2, data=-1)
    c.pipeline.update(microbatches=2)
    for key, value in changes.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


def test_config_turns_the_pipeline_on():
    """``--config.mesh.stage=2 --config.pipeline.microbatches=2``: the trainer's setup wraps the family in
    ``Pipelined`` and its train step (optimizer included) traces through the pipeline; with
    mesh.stage=1 the model is the family's own. (The numbers are the tests above.)"""
    for stage in (2, 1):
        c = _config(mesh__stage=stage)
        s = setup_training(c, mesh_lib.make_mesh(c.mesh))
        assert isinstance(s.model, pl.Pipelined) == (stage == 2)
        if stage == 2:
            assert (s.model.stages, s.model.microbatches, s.model.repeats) == (2, 2, 1)
        with sharding.activate(s.mesh, s.rules):
            state, metrics = jax.eval_shape(s.train_step, s.abstract_state(), s.abstract_batch())
        assert metrics["loss"].shape == () and jax.tree.structure(state) == jax.tree.structure(s.state_shape)


@pytest.mark.parametrize("changes, match", [
    (dict(model__n_layers=6, mesh__stage=4), r"layer units .* \(6\) cannot be split into 4 stages"),
    (dict(pipeline__circular_repeats=2, mesh__stage=4), r"cannot be split into 4 stages x 2 circular"),
    (dict(pipeline__microbatches=3), r"train.batch_size \(8\) is not divisible by pipeline.microbatches \(3\)"),
    (dict(pipeline__microbatches=4, mesh__data=2, mesh__fsdp=2), r"microbatches \(4\) x the 4 devices"),
    (dict(pipeline__microbatches=1, pipeline__circular_repeats=2), r"circular schedule needs pipeline.microbatches"),
    (dict(pipeline__microbatches=0), r"pipeline.microbatches is 0"),
    (dict(pipeline__remat="some"), r"pipeline.remat is 'some'"),
    (dict(mesh__stage=16, mesh__data=1), r"stage=16 = 16 devices but 8 are available"),
])
def test_bad_input(changes, match):
    c = _config(**changes)
    with pytest.raises(ValueError, match=match):
        setup_training(c, mesh_lib.make_mesh(c.mesh))
