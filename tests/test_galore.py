"""GaLore (train/galore.py): against a float64 NumPy reference of the same algorithm (both orientations,
Adam and AdamW inside, several steps across projection refreshes), the SGD identity at full rank, the
projected state shapes and their axes, sharded on fsdp x tensor equal to one device, bad input, the
trainer with optim.name='galore' (checkpoint and resume), and the difference from optax.contrib."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parallel import mesh as mesh_lib
from parallel import sharding
from tests.conftest import xla_flags
from tests.helpers import jit, tiny_train_config
from train import bench, galore, metrics
from train import config as config_lib
from train.setup import setup_training

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stacked [layers, embed, mlp] matrix with m >= n (projected on the right), an [embed, heads, head_dim]
# weight seen as (embed, heads * head_dim) with m < n (left), and a norm scale (not projected).
AXES = {"stack": ("layers", "embed", "mlp"), "attn": ("embed", "heads", "head_dim"), "norm": ("norm",)}
SHAPES = {"stack": (2, 12, 7), "attn": (6, 2, 5), "norm": (6,)}
B1, B2, EPS, LR = 0.9, 0.95, 1e-8, 0.05


def _grads(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(steps)]


# ----------------------------------------------------------------------------- float64 reference

def _signs(v):
    """Columns with their largest-magnitude entry positive."""
    idx = np.argmax(np.abs(v), axis=-2)[..., None, :]
    return v * np.sign(np.take_along_axis(v, idx, axis=-2))


def ref_galore(params, grads, rank, gap, scale, proj_type, wd, eps=EPS):
    """Algorithm 1 of the paper in float64 NumPy, one matrix at a time: Adam on the projected gradient,
    update projected back times ``scale``, decoupled weight decay on the full weight, learning rate LR."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    state = {}
    for t, g in enumerate(grads):
        for k, w in params.items():
            gk = np.asarray(g[k], np.float64)
            if k == "norm":
                mat, back = gk, lambda x: x
            else:
                mat = gk if k == "stack" else gk.reshape(gk.shape[0], -1)  # [2, 12, 7] or [6, 2 * 5]
                m, n = mat.shape[-2:]
                side = {"std": "right" if m >= n else "left", "full": "both"}.get(proj_type, proj_type)
                if t % gap == 0:
                    u, _, vh = np.linalg.svd(mat, full_matrices=False)
                    state[k, "P"] = _signs(u[..., :rank]), _signs(np.swapaxes(vh, -1, -2)[..., :rank])
                p, q = state[k, "P"]
                pt = np.swapaxes(p, -1, -2)
                qt = np.swapaxes(q, -1, -2)
                if side in ("left", "both"):
                    mat = pt @ mat
                if side in ("right", "both"):
                    mat = mat @ q

                def back(x, p=p, qt=qt, side=side, shape=gk.shape):
                    if side in ("left", "both"):
                        x = p @ x
                    if side in ("right", "both"):
                        x = x @ qt
                    return scale * x.reshape(shape)
            mu = B1 * state.get((k, "mu"), 0) + (1 - B1) * mat
            nu = B2 * state.get((k, "nu"), 0) + (1 - B2) * mat**2
            state[k, "mu"], state[k, "nu"] = mu, nu
            n_hat = (mu / (1 - B1 ** (t + 1))) / (np.sqrt(nu / (1 - B2 ** (t + 1))) + eps)
            decay = wd * w if k != "norm" else 0.0
            params[k] = w - LR * (back(n_hat) + decay)
    return params


def run_galore(params, grads, inner, outer=True, **kw):
    """The transform under jit, chained as train.optim does (``outer``): galore, decoupled decay (matrices), lr."""
    wd = kw.pop("wd", 0.0)
    mask = {"stack": True, "attn": True, "norm": False}
    tx = galore.galore(inner, AXES, **kw)
    if outer:
        tx = optax.chain(tx, optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(LR))
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)

    @jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for g in grads:
        params, state = step(params, state, g)
    return params, state


PARAMS = {k: np.random.default_rng(7).normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


# 'full' projects both sides: at a refresh P^T G Q is diagonal (the singular values) up to float32 rounding
# off the diagonal, which Adam with a tiny eps would blow up to +-1; eps 1e-2 keeps that rounding small.
@pytest.mark.parametrize("proj_type, wd, steps, eps", [("std", 0.0, 1, EPS), ("std", 0.1, 5, EPS),
                                                       ("left", 0.1, 3, EPS), ("full", 0.1, 3, 1e-2)],
                         ids=["adam-1step", "adamw-5steps-refresh", "adamw-left-3steps", "adamw-full-3steps"])
def test_matches_float64_reference(proj_type, wd, steps, eps):
    """Across refreshes at steps 0, 2, 4 (gap 2), both orientations in one tree (the stacked m >= n matrix
    projected on the right, the (embed, heads*head_dim) m < n one on the left), the norm unprojected."""
    grads = _grads(steps)
    got, state = run_galore(PARAMS, grads, optax.scale_by_adam(B1, B2, eps), rank=3, update_proj_gap=2,
                            scale=0.25, proj_type=proj_type, wd=wd)
    want = ref_galore(PARAMS, grads, rank=3, gap=2, scale=0.25, proj_type=proj_type, wd=wd, eps=eps)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
        assert np.abs(np.asarray(got[k]) - PARAMS[k]).max() > 1e-3  # every leaf moved
    assert int(state[0].count) == steps


def test_sgd_inside_at_full_rank_is_plain_sgd():
    """Rank = the smaller side and scale 1: P P^T = I on that side, so GaLore(SGD) is SGD (refresh every step)."""
    grads = _grads(3, seed=1)
    want = {k: PARAMS[k] - LR * sum(g[k] for g in grads) for k in SHAPES}
    for name, rank in (("attn", 6), ("stack", 7)):  # 6 x 10 projected on the left, 12 x 7 on the right
        got, state = run_galore(PARAMS, grads, optax.sgd(LR), outer=False, rank=rank, update_proj_gap=1, scale=1.0,
                                selection={k: k == name for k in SHAPES})
        for k in SHAPES:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
        assert [p is not None for p in state.projectors] == [k == name for k in sorted(SHAPES)]


def test_randomized_svd_finds_the_subspace():
    """On a gradient of exact rank r the randomized range finder spans the SVD's subspace."""
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.normal(size=(2, 40, 3)) @ rng.normal(size=(2, 3, 30)), jnp.float32)
    lay = galore.layout(g.shape, ("layers", "embed", "mlp"), 3, "full")
    projectors = jit(galore.projectors_of, static_argnums=(1, 2))
    exact = projectors(g, lay, False, None)
    rand = projectors(g, lay, True, jax.random.PRNGKey(0))
    for side in ("left", "right"):
        proj = lambda p: np.einsum("bmr,bnr->bmn", p, p)  # noqa: E731
        np.testing.assert_allclose(proj(rand[side]), proj(exact[side]), atol=1e-4)


def test_differs_from_optax_contrib_by_the_projected_side():
    """optax.contrib.galore projects an m >= n gradient on the left (Adam on U_r^T G); ours, like the official
    implementation, on the right (Adam on G V_r). Forcing proj_type='left' reproduces optax's update. (With
    SGD inside, one step is the rank-r truncation of G either way: U_r U_r^T G = G V_r V_r^T.)"""
    contrib = pytest.importorskip("optax.contrib")
    if not hasattr(contrib, "scale_by_galore"):
        pytest.skip("this optax has no contrib.scale_by_galore")
    g = {"w": jnp.asarray(np.random.default_rng(4).normal(size=(12, 7)), jnp.float32)}
    axes = {"w": ("embed", "mlp")}
    theirs = contrib.scale_by_galore(rank=3, update_proj_gap=1, scale=1.0, base_optimizer=optax.scale_by_adam())
    theirs_u, _ = theirs.update(g, theirs.init(g))

    def ours(proj_type):
        tx = galore.galore(optax.scale_by_adam(), axes, rank=3, update_proj_gap=1, scale=1.0, proj_type=proj_type)
        return tx.update(g, tx.init(g))[0]["w"]

    np.testing.assert_allclose(ours("left"), theirs_u["w"], rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(ours("std")) - np.asarray(theirs_u["w"])).max() > 0.1


# ----------------------------------------------------------------------------- through the trainer's setup

def galore_config(**optim_fields):
    c = tiny_train_config(steps=4, ckpt_every=2)
    c.model.vocab_size = 264  # divisible by the tensor axis
    c.optim.update({**dict(name="galore", galore_rank=4, galore_gap=2), **optim_fields})
    return c


def test_state_shapes_and_axes_are_the_projected_ones():
    c = galore_config()
    setup = setup_training(c, mesh_lib.make_mesh(c.mesh, jax.devices()[:1]))
    gal = setup.state_shape.opt_state[1][0]  # chain(clip, chain(galore, decay, lr))
    axes = setup.state_axes.opt_state[1][0]
    adam, adam_axes = gal.inner_state, axes.inner_state
    layers = adam.mu["layers"]  # d_model 32, 2 heads of 16, d_ff 64, rank 4
    assert layers["wq"].shape == (2, 32, 4) and adam_axes.mu["layers"]["wq"] == ("layers", "embed", "lora")
    assert layers["w_up"].shape == (2, 4, 64) and adam_axes.nu["layers"]["w_up"] == ("layers", "lora", "mlp")
    assert layers["w_down"].shape == (2, 64, 4) and adam_axes.mu["layers"]["w_down"] == ("layers", "mlp", "lora")
    assert adam.mu["embed"].shape == setup.state_shape.params["embed"].shape  # not projected
    assert layers["attn_norm"].shape == (2, 32)
    by_path = dict(zip([sharding.path_name(p) for p, _ in
                        jax.tree_util.tree_flatten_with_path(setup.state_shape.params)[0]], gal.projectors))
    assert by_path["layers/w_up"]["left"].shape == (2, 32, 4) and by_path["embed"] is None
    assert by_path["layers/wq"]["right"].shape == (2, 32, 4)


@pytest.fixture(scope="module")
def sharded_runs():
    """Three real train steps (a refresh at 0 and 2) on one device and on fsdp=4 x tensor=2."""
    out = {}
    for name, mesh_cfg, devices in (("one", {}, jax.devices()[:1]), ("mesh", {"fsdp": 4, "tensor": 2}, None)):
        c = galore_config()
        c.mesh.update(data=1, **mesh_cfg)
        c.optim.warmup_steps = 0
        setup = setup_training(c, mesh_lib.make_mesh(c.mesh, devices))
        batch = sharding.global_batch(bench.random_batch(setup), setup.mesh, setup.rules)
        with sharding.activate(setup.mesh, setup.rules):
            state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.PRNGKey(0))
            step = setup.jit_train_step()
            losses = []
            for _ in range(3):
                state, m = step(state, batch)
                losses.append(float(m["loss"]))
        out[name] = (losses, state)
    return out


def test_sharded_equals_one_device(sharded_runs):
    (losses, state), (ref_losses, ref_state) = sharded_runs["mesh"], sharded_runs["one"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert len(set(losses)) == 3
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    gal = state.opt_state[1][0]
    assert gal.inner_state.mu["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec("stage", "fsdp", None)
    assert gal.inner_state.mu["layers"]["w_up"].sharding.spec == jax.sharding.PartitionSpec("stage", None, "tensor")
    wq = [i for i, lay in enumerate(gal.layouts) if lay and lay.names == ("layers", "embed", "heads")][0]
    assert gal.projectors[wq]["right"].sharding.spec == jax.sharding.PartitionSpec("stage", "tensor", None)
    assert int(gal.count) == 3


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("field, value, match", [
    ("galore_gap", 0, r"optim.galore_gap is 0; set it to a positive integer"),
    ("galore_rank", 0, r"optim.galore_rank is 0"),
    ("galore_proj", "both", r"optim.galore_proj is 'both'; use one of"),
    ("galore_inner", "adam", r"optim.galore_inner is 'adam'; use one of"),
    ("galore_select", "layers/(", r"optim.galore_select \('layers/\('\) is not a regular expression"),
])
def test_bad_fields_refused_by_validate(field, value, match):
    c = galore_config(**{field: value})
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c)


@pytest.mark.parametrize("fields, match", [
    (dict(galore_rank=40), r"galore rank 40 \(optim.galore_rank\) exceeds the smaller side of layers/w_down "
                           r"\(64 x 32 as a matrix"),
    (dict(galore_select="layers/attn"), r"selection \(optim.galore_select\) 'layers/attn' matches no parameter"),
    (dict(galore_select="layers/w.*|final_norm"), r"matches final_norm \(axes \('norm',\)\), which is not a matrix"),
])
def test_bad_rank_or_selection_refused_before_compiling(fields, match):
    c = galore_config(**fields)
    with pytest.raises(ValueError, match=match):
        setup_training(c, mesh_lib.make_mesh(c.mesh, jax.devices()[:1]))


def test_transform_arguments_refused():
    with pytest.raises(ValueError, match="update_proj_gap is 0"):
        galore.galore(optax.identity(), AXES, rank=2, update_proj_gap=0)
    with pytest.raises(ValueError, match="proj_type is 'reverse'"):
        galore.galore(optax.identity(), AXES, rank=2, proj_type="reverse")


# ----------------------------------------------------------------------------- trainer

@pytest.mark.timeout(120)
def test_trainer_command_line(tmp_path):
    """`python -m train` with optim.name='galore' (one CPU device) for 4 steps, a refresh at 0
    and 3, checkpoints (GaLore's state included) at 2 and 4."""
    sizes = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, dtype="float32")
    train = dict(steps=4, batch_size=8, seq_len=64, log_every=1, eval_every=0, exact_match_every=0, ckpt_every=2,
                 progress=False)
    optim_ = dict(name="galore", galore_rank=4, galore_gap=3, warmup_steps=1)
    overrides = ([f"--config.model.{k}={v}" for k, v in sizes.items()] + ["--config.data.max_steps=3"] +
                 [f"--config.train.{k}={v}" for k, v in train.items()] +
                 [f"--config.optim.{k}={v}" for k, v in optim_.items()])
    cmd = [sys.executable, "-m", "train", "--config", "experiments/arith_cot.py", "--workdir", str(tmp_path)]
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd + overrides, cwd=ROOT, capture_output=True, text=True, timeout=110, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    records = metrics.read_jsonl(str(tmp_path))
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 5)) and all(np.isfinite(list(losses.values())))
    assert {2, 4} <= {int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()}
