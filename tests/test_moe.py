"""Switch MoE layer (models/moe.py) and expert parallelism (parallel/expert.py).

References: float64 NumPy for the router math and a naive per-token loop (capacity slots
by position, all first choices before second choices) for the layer; a per-token jnp loop
for gradients; the single-device layer for the expert-parallel layer on 8 host devices.
"""
import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import moe
from parallel import expert as pexpert
from parallel import mesh as pmesh
from parallel import sharding
from train.config import DEFAULT_RULES

pytestmark = pytest.mark.timeout(60)

D, F, E = 8, 16, 4


def layer_params(cfg, seed=0, d=D, f=F, router_std=1.0):
    """One layer's params (NumPy draws: no compile); a wide router keeps the top-k choices far from ties."""
    rng = np.random.default_rng(seed)
    n = cfg.num_experts
    draw = lambda shape, std: jnp.asarray(rng.normal(0, std, shape), jnp.float32)  # noqa: E731
    return {"router": draw((d, n), router_std), "w_gate": draw((n, d, f), d ** -0.5),
            "w_up": draw((n, d, f), d ** -0.5), "w_down": draw((n, f, d), f ** -0.5)}


# The layer jitted (cfg and train static): eager dispatch would compile op by op. Not for use under
# ``sharding.activate``: a cached trace would ignore the mesh.
APPLY = jax.jit(moe.apply, static_argnames=("cfg", "train"))
ROUTE = jax.jit(moe.route, static_argnames=("cfg", "cap"))
ROUTER_AUX = jax.jit(moe.router_aux, static_argnames=("cfg",))
INIT = jax.jit(moe.init, static_argnums=(0, 2, 3, 4, 5))


def inputs(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ----------------------------------------------------------------------------- float64 references

def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_expert(p, e, v):
    g, u = v @ p["w_gate"][e], v @ p["w_up"][e]
    return (g / (1 + np.exp(-g)) * u) @ p["w_down"][e]


def naive(p, x, cfg, train):
    """Per-token loop in float64: (y [b, s, d], aux dict, top [G, S, k], kept set of (g, t, j))."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    b, s, d = x.shape
    T, k, n = b * s, cfg.top_k, cfg.num_experts
    size = cfg.group_size if T % cfg.group_size == 0 else T
    cap = moe.capacity(cfg, size, train) if cfg.dispatch == "capacity" else None
    xg = x.reshape(T // size, size, d)
    y = np.zeros_like(xg)
    logits = xg @ p["router"]
    probs = np_softmax(logits)
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    srt = -np.sort(-probs, axis=-1)
    assert (srt[..., k - 1] - (srt[..., k] if k < n else 0)).min() > 1e-4, "near-tie in the test routing"
    gates = np.take_along_axis(probs, top, -1)
    if cfg.normalize_gates:
        gates = gates / gates.sum(-1, keepdims=True)
    kept = set()
    for g in range(len(xg)):
        counts = np.zeros(n, int)
        for j in range(k):  # all first choices, then all second choices
            for t in range(size):
                e = top[g, t, j]
                if cap is None or counts[e] < cap:
                    counts[e] += 1
                    kept.add((g, t, j))
                    y[g, t] += gates[g, t, j] * np_expert(p, e, xg[g, t])
    f = np.stack([[np.isin(top[g], i).any(-1).mean() / k for i in range(n)] for g in range(len(xg))])  # [G, N]
    P_ = probs.mean(1)
    load = f.mean(0)
    nz = load[load > 0]
    aux = {
        "aux_loss": cfg.aux_loss_coef * n * np.mean((f * P_).sum(-1)),
        "z_loss": cfg.z_loss_coef * np.mean(np.log(np.exp(logits).sum(-1)) ** 2),
        "dropped_fraction": 1 - len(kept) / (T * k),
        "load_min": load.min(), "load_max": load.max(),
        "load_entropy": -(nz * np.log(nz)).sum() / np.log(n),
    }
    return y.reshape(b, s, d), aux, top, kept


def check_aux(aux, ref, rtol=1e-5):
    assert set(aux) == set(ref)
    for key in ref:
        assert aux[key].dtype == jnp.float32 and aux[key].shape == ()
        np.testing.assert_allclose(aux[key], ref[key], rtol=rtol, atol=1e-7, err_msg=key)


# ----------------------------------------------------------------------------- router math

def test_router_math_against_float64():
    cfg = moe.MoEConfig(num_experts=E, top_k=2, group_size=8, aux_loss_coef=0.03, z_loss_coef=0.002)
    p = layer_params(cfg)
    x = inputs((2, 8, D))
    r = ROUTE(p["router"], x.reshape(2, 8, D), cfg, moe.capacity(cfg, 8, True))
    logits = np.asarray(x, np.float64).reshape(2, 8, D) @ np.asarray(p["router"], np.float64)
    probs = np_softmax(logits)
    np.testing.assert_allclose(r.logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.probs, probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(r.experts, np.argsort(-probs, -1)[..., :2])
    np.testing.assert_allclose(r.gates, -np.sort(-probs, -1)[..., :2], rtol=1e-5)  # raw top-k probabilities
    _, ref, _, _ = naive(p, x, cfg, train=True)
    check_aux(ROUTER_AUX(r, cfg), ref)
    # Hand check of eq. 4-6 on one group: f_i from the choices, P_i the mean probability.
    f = np.array([(np.asarray(r.experts[0]) == i).any(-1).mean() / 2 for i in range(E)])
    assert math.isclose(f.sum(), 1.0)
    balanced = ROUTER_AUX(r._replace(probs=jnp.full_like(r.probs, 1 / E)), cfg)["aux_loss"]
    np.testing.assert_allclose(balanced, 0.03, rtol=1e-6)  # alpha N sum_i f_i / N = alpha whatever f is


def test_normalized_gates_sum_to_one():
    cfg = moe.MoEConfig(num_experts=E, top_k=2, group_size=8, normalize_gates=True)
    r = ROUTE(layer_params(cfg)["router"], inputs((2, 8, D)), cfg, None)
    np.testing.assert_allclose(r.gates.sum(-1), 1.0, rtol=1e-6)


def test_bf16_compute_keeps_float32_router():
    cfg = moe.MoEConfig(num_experts=E, group_size=8)
    p = layer_params(cfg)
    x = inputs((2, 8, D)).astype(jnp.bfloat16)
    r = ROUTE(p["router"], x, cfg, 3)
    assert r.logits.dtype == r.probs.dtype == r.gates.dtype == jnp.float32
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(p["router"], np.float64)
    np.testing.assert_allclose(r.logits, ref, rtol=1e-5, atol=1e-6)  # bf16 inputs, float32 products
    y, aux = APPLY(p, x, cfg=cfg, train=True)
    assert y.dtype == jnp.bfloat16 and all(v.dtype == jnp.float32 for v in aux.values())
    y32, _ = APPLY(p, x.astype(jnp.float32), cfg=cfg, train=True)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=5e-2, atol=5e-2 * float(jnp.abs(y32).max()))


# ----------------------------------------------------------------------------- capacity and drops

def test_capacity_rounding():
    c = lambda cf, size, k=1, n=4: moe.capacity(
        moe.MoEConfig(num_experts=n, top_k=k, capacity_factor_train=cf, group_size=size), size, True)
    assert c(1.25, 8) == 3  # ceil(2.5)
    assert c(1.0, 8) == 2 and c(1.0, 8, k=2) == 4
    assert 1.1 * 100 / 10 > 11 and c(1.1, 100, n=10) == 11  # rounded before the ceiling
    assert c(0.01, 8) == 1 and c(8.0, 8) == 8  # at least 1, at most the group
    cfg = moe.MoEConfig(num_experts=4, group_size=8)
    assert moe.capacity(cfg, 8, train=True) == 3 and moe.capacity(cfg, 8, train=False) == 4


def one_hot_router(assign, second=None):
    """x rows = one-hot of the wanted expert (plus 0.5 x the second choice); router = 10 I."""
    x = np.eye(E)[np.asarray(assign)]
    if second is not None:
        x = x + 0.5 * np.eye(E)[np.asarray(second)]
    return jnp.asarray(x[None], jnp.float32), 10.0 * jnp.eye(E)


def test_overflow_tokens_are_dropped_by_position():
    cfg = moe.MoEConfig(num_experts=E, group_size=8, capacity_factor_train=1.0)  # C = 2
    x, router = one_hot_router([0, 0, 0, 1, 1, 2, 0, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    p = {**layer_params(cfg, d=E), "router": router}
    y, aux = APPLY(p, x, cfg=cfg, train=True)
    y = np.asarray(y[0])
    assert np.all(y[[2, 6]] == 0.0)  # third and fourth token for expert 0 in group 0: exactly zero
    assert np.all(np.abs(y[[0, 1, 3, 4, 5, 7]]).max(-1) > 0) and np.all(np.abs(y[8:]).max(-1) > 0)
    np.testing.assert_allclose(aux["dropped_fraction"], 2 / 16)
    ref, ref_aux, _, _ = naive(p, x, cfg, train=True)
    np.testing.assert_allclose(y, ref[0], rtol=1e-5, atol=1e-7)
    check_aux(aux, ref_aux)
    _, aux_eval = APPLY(p, x, cfg=cfg, train=False)  # eval capacity 2.0 -> C = 4: nothing dropped
    assert float(aux_eval["dropped_fraction"]) == 0.0


def test_top2_first_choices_before_second_choices():
    # Tokens 0-3: expert 0 then 1; tokens 4-7: expert 1 then 2. C = 4, so expert 1 fills with the
    # first choices of tokens 4-7 and drops the (earlier-positioned) second choices of tokens 0-3.
    cfg = moe.MoEConfig(num_experts=E, top_k=2, group_size=8, capacity_factor_train=1.0)
    x, router = one_hot_router([0, 0, 0, 0, 1, 1, 1, 1], second=[1, 1, 1, 1, 2, 2, 2, 2])
    p = {**layer_params(cfg, d=E), "router": router}
    r = ROUTE(router, x, cfg, moe.capacity(cfg, 8, True))
    np.testing.assert_array_equal(r.keep[0], [[True, False]] * 4 + [[True, True]] * 4)
    y, aux = APPLY(p, x, cfg=cfg, train=True)
    np.testing.assert_allclose(aux["dropped_fraction"], 4 / 16)
    ref, ref_aux, _, _ = naive(p, x, cfg, train=True)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-7)
    check_aux(aux, ref_aux)


# ----------------------------------------------------------------------------- dispatch paths vs the naive loop

@pytest.mark.parametrize("dispatch, top_k, normalize, train", [
    ("capacity", 1, False, True), ("capacity", 1, False, False), ("capacity", 2, False, True),
    ("capacity", 2, True, True), ("dropless", 1, False, True), ("dropless", 2, False, False),
])
def test_layer_matches_naive_loop(dispatch, top_k, normalize, train):
    cfg = moe.MoEConfig(num_experts=E, top_k=top_k, group_size=8, dispatch=dispatch, capacity_factor_train=1.0,
                        normalize_gates=normalize)
    p = layer_params(cfg, seed=top_k)
    x = inputs((2, 12, D), seed=3)
    y, aux = APPLY(p, x, cfg=cfg, train=train)
    ref, ref_aux, _, _ = naive(p, x, cfg, train)
    chex.assert_shape(y, x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    check_aux(aux, ref_aux)
    if dispatch == "capacity" and train:
        assert float(aux["dropped_fraction"]) > 0  # the test exercises drops
    if dispatch == "dropless":
        assert float(aux["dropped_fraction"]) == 0


def test_capacity_equals_dropless_when_nothing_drops():
    x = inputs((2, 8, D))
    big = moe.MoEConfig(num_experts=E, top_k=2, group_size=8, capacity_factor_train=float(E))  # C = group size
    p = layer_params(big)
    y_cap, aux_cap = APPLY(p, x, cfg=big, train=True)
    y_dl, aux_dl = APPLY(p, x, cfg=moe.MoEConfig(num_experts=E, top_k=2, group_size=8, dispatch="dropless"),
                         train=True)
    assert float(aux_cap["dropped_fraction"]) == 0
    np.testing.assert_allclose(y_cap, y_dl, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(aux_cap, aux_dl, rtol=1e-6)


def test_dropless_any_token_count():
    """Decoding feeds batch x 1 tokens: dropless routes them as one group."""
    cfg = moe.MoEConfig(num_experts=E, top_k=2, group_size=8, dispatch="dropless")
    p = layer_params(cfg)
    x = inputs((3, 1, D))
    y, aux = APPLY(p, x, cfg=cfg, train=False)
    ref, ref_aux, _, _ = naive(p, x, cfg, train=False)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    check_aux(aux, ref_aux)


# ----------------------------------------------------------------------------- gradients

@jax.jit
def token_expert(x_rows, p, t, e):
    """Expert e on token t: x_rows [T, d] -> [d]. (Whole arrays and traced indices: one compile.)"""
    v = x_rows[t]
    return (jax.nn.silu(v @ p["w_gate"][e]) * (v @ p["w_up"][e])) @ p["w_down"][e]


@functools.partial(jax.jit, static_argnames=("normalize",))
def token_gates(probs_rows, t, chosen, normalize):
    """The top-k gates [k] of token t from probabilities [T, N] and its chosen experts [k]."""
    gates = jnp.take(probs_rows[t], chosen)
    return gates / gates.sum() if normalize else gates


@functools.partial(jax.jit, static_argnames=("alpha", "beta"))
def router_losses(router, xg, f, alpha, beta):
    """probs [G, S, N] and alpha N mean_g sum_i f_i P_i + beta mean logsumexp^2, f [G, N] given."""
    logits = xg @ router
    probs = jax.nn.softmax(logits, -1)
    aux = alpha * f.shape[-1] * jnp.mean(jnp.sum(f * probs.mean(1), -1))
    return probs, aux + beta * jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)


def naive_loss_jnp(p, x, cfg, top, kept, cot):
    """The per-token loop in jnp, routing decisions fixed (they have no gradient): sum(y * cot) + aux + z.

    Eager Python loop over tokens and choices; its pieces are small jitted functions so that
    eager autodiff compiles each once rather than every primitive."""
    d = x.shape[-1]
    G, S, k = top.shape
    f = jnp.asarray(np.stack([[np.isin(top[g], i).any(-1).mean() / k for i in range(E)] for g in range(G)]))
    probs, losses = router_losses(p["router"], x.reshape(G, S, d), f, cfg.aux_loss_coef, cfg.z_loss_coef)
    x_rows, p_rows = x.reshape(G * S, d), probs.reshape(G * S, -1)
    experts = {name: p[name] for name in moe.EXPERT_WEIGHTS}
    loss = losses
    for g in range(G):
        for t in range(S):
            i = g * S + t
            gates = token_gates(p_rows, i, top[g, t], cfg.normalize_gates)
            for j in range(k):
                if (g, t, j) in kept:
                    y = gates[j] * token_expert(x_rows, experts, i, top[g, t, j])  # this choice's part of y[t]
                    loss = loss + jnp.vdot(y, cot.reshape(G * S, d)[i])
    return loss


@pytest.mark.parametrize("dispatch, top_k", [("capacity", 1), ("capacity", 2), ("dropless", 2)])
def test_gradients_match_naive_loop(dispatch, top_k):
    cfg = moe.MoEConfig(num_experts=E, top_k=top_k, group_size=8, dispatch=dispatch, capacity_factor_train=1.0,
                        aux_loss_coef=0.1, z_loss_coef=0.01)
    p = layer_params(cfg, seed=5)
    x = inputs((2, 8, D), seed=6)
    cot = inputs((2, 8, D), seed=7)
    _, _, top, kept = naive(p, x, cfg, train=True)

    def loss(p, x):
        y, aux = APPLY(p, x, cfg=cfg, train=True)
        return jnp.sum(y * cot) + aux["aux_loss"] + aux["z_loss"]

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)
    want = jax.grad(naive_loss_jnp, argnums=(0, 1))(p, x, cfg, top, kept, cot)  # eager: compiles once per op
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(got[0]["router"]).max()) > 0


# ----------------------------------------------------------------------------- init, axes, dropout

def test_init_shapes_scale_and_axes():
    cfg = moe.MoEConfig(num_experts=E, group_size=8)
    p = INIT(cfg, jax.random.key(0), 64, 128, 3, "bfloat16")
    chex.assert_shape([p["router"], p["w_gate"], p["w_up"], p["w_down"]],
                      [(3, 64, E), (3, E, 64, 128), (3, E, 64, 128), (3, E, 128, 64)])
    chex.assert_type(list(p.values()), jnp.bfloat16)
    for name, fan_in in (("w_gate", 64), ("w_down", 128), ("router", 64)):
        w = np.asarray(p[name], np.float32)
        std = math.sqrt(0.1 / fan_in)
        assert np.abs(w).max() <= 2 * std * 1.01  # truncated at 2 std
        np.testing.assert_allclose(w.std(), 0.8796 * std, rtol=0.06)  # std of N(0,1) truncated at +-2
    axes = moe.param_axes(cfg)
    assert jax.tree.structure(p) == jax.tree.structure(axes, is_leaf=lambda t: isinstance(t, tuple))
    assert all(len(axes[k]) == p[k].ndim for k in p)
    assert sharding.logical_to_spec(axes["w_gate"], DEFAULT_RULES) == P("stage", "expert", "fsdp", "tensor")
    assert moe.moe_layers(moe.MoEConfig(every=2), 6) == (1, 3, 5) and moe.moe_layers(cfg, 2) == (0, 1)
    assert hash(cfg) == hash(moe.MoEConfig(num_experts=E, group_size=8))


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_dropout(dispatch):
    cfg = moe.MoEConfig(num_experts=E, group_size=8, dispatch=dispatch, expert_dropout=0.5)
    p = layer_params(cfg)
    x = inputs((2, 8, D))
    with pytest.raises(ValueError, match=r"needs rng="):
        APPLY(p, x, cfg=cfg, train=True)
    y1, _ = APPLY(p, x, cfg=cfg, train=True, rng=jax.random.key(1))
    y2, _ = APPLY(p, x, cfg=cfg, train=True, rng=jax.random.key(1))
    y3, _ = APPLY(p, x, cfg=cfg, train=True, rng=jax.random.key(2))
    y_eval, _ = APPLY(p, x, cfg=cfg, train=False)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y3) and not np.allclose(y1, y_eval)
    np.testing.assert_allclose(y_eval, naive(p, x, cfg, train=False)[0], rtol=1e-5, atol=1e-6)  # no dropout at eval


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=2, top_k=3), r"moe.top_k \(3\) exceeds moe.num_experts \(2\)"),
    (dict(capacity_factor_train=0.0), r"moe.capacity_factor_train is 0.0 but the capacity path"),
    (dict(capacity_factor_eval=-1.0), r"moe.capacity_factor_eval is -1.0"),
    (dict(dispatch="sorted"), r"moe.dispatch is 'sorted'"),
    (dict(num_experts=0), r"moe.num_experts is 0"),
    (dict(group_size=2.5), r"moe.group_size is 2.5"),
    (dict(expert_dropout=1.0), r"moe.expert_dropout is 1.0"),
    (dict(z_loss_coef=-1e-3), r"moe.z_loss_coef is -0.001"),
    (dict(normalize_gates=True), r"normalize_gates with moe.top_k=1"),
    (dict(every=0), r"moe.every is 0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe.MoEConfig(**kwargs)


def test_dropless_ignores_capacity_factor_and_shape_errors():
    moe.MoEConfig(dispatch="dropless", capacity_factor_train=0.0)  # no capacity on this path
    cfg = moe.MoEConfig(num_experts=E, group_size=8)
    with pytest.raises(ValueError, match=r"moe.group_size \(8\) does not divide .* batch x seq = 12"):
        moe.apply(layer_params(cfg), inputs((2, 6, D)), cfg, train=True)


def test_mesh_errors():
    cfg = moe.MoEConfig(num_experts=6, group_size=8)
    mesh = pmesh.make_mesh({"data": 2, "expert": 4})
    with pytest.raises(ValueError, match=r"moe.num_experts \(6\) is not divisible by the expert mesh axis \(4\)"):
        moe.validate_mesh(cfg, mesh, DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"moe.num_experts \(6\) is not divisible by the expert mesh axis \(4\)"):
        pexpert.check(6, 8, mesh, DEFAULT_RULES)
    cfg = moe.MoEConfig(num_experts=8, group_size=8)
    moe.validate_mesh(cfg, mesh, DEFAULT_RULES, tokens=64)
    with pytest.raises(ValueError, match=r"moe.group_size \(\d+\) does not divide .* batch x seq = 60"):
        moe.validate_mesh(cfg, mesh, DEFAULT_RULES, tokens=60)
    with pytest.raises(ValueError, match=r"holds 4 MoE routing groups, which the data x expert axes \(2 x 4 = 8\) "
                                         r"cannot split"):
        moe.validate_mesh(cfg, mesh, DEFAULT_RULES, tokens=32)
    moe.validate_mesh(dataclasses.replace(cfg, dispatch="dropless"), mesh, DEFAULT_RULES, tokens=32)  # no groups
    assert pexpert.check(8, 8, pmesh.make_mesh({"data": 8}), DEFAULT_RULES) is None  # no expert axis: no EP
    # experts mapped to another axis: the checks follow the rule, not the axis name
    rules = tuple((n, "tensor" if n == "experts" else t) for n, t in DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"moe.num_experts \(6\) is not divisible by the tensor mesh axis \(4\)"):
        moe.validate_mesh(moe.MoEConfig(num_experts=6, group_size=8), pmesh.make_mesh({"data": 2, "tensor": 4}), rules)


# ----------------------------------------------------------------------------- expert parallelism

EP_CFG = moe.MoEConfig(num_experts=8, top_k=2, group_size=4, capacity_factor_train=1.0, expert_dropout=0.1)
EP_LAYERS = 2


@functools.cache
def ep_problem():
    layers = [layer_params(EP_CFG, seed=i) for i in range(EP_LAYERS)]
    return jax.tree.map(lambda *a: jnp.stack(a), *layers), inputs((8, 8, D), seed=2), inputs((8, 8, D), seed=4)


def ep_loss(p, x, cot):
    """Two residual MoE layers under remat and lax.scan (as the model runs layers): scalar loss, stacked aux."""
    def body(h, xs):
        pl, i = xs
        y, aux = moe.apply(pl, h, EP_CFG, train=True, rng=jax.random.fold_in(jax.random.key(3), i))
        return h + y, aux

    body = jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names("mlp_hidden"))
    h, aux = jax.lax.scan(body, x, (p, jnp.arange(EP_LAYERS)))
    return jnp.sum(h * cot) + jnp.sum(aux["aux_loss"] + aux["z_loss"]), (h, aux)


@functools.cache
def ep_reference():
    return jax.jit(jax.value_and_grad(ep_loss, argnums=(0, 1), has_aux=True))(*ep_problem())


@pytest.mark.parametrize("mesh_cfg", [{"expert": 8}, {"data": 2, "expert": 4}, {"data": 2, "fsdp": 2, "expert": 2}])
def test_expert_parallel_equals_single_device(mesh_cfg):
    (loss, (h, aux)), grads = ep_reference()
    assert float(aux["dropped_fraction"].min()) > 0
    mesh = pmesh.make_mesh(mesh_cfg)
    p, x, cot = ep_problem()
    with sharding.activate(mesh, DEFAULT_RULES):
        p = jax.device_put(p, sharding.tree_shardings(moe.param_axes(EP_CFG), mesh, DEFAULT_RULES))
        x, cot = jax.device_put((x, cot), NamedSharding(mesh, sharding.logical_to_spec(("batch",), DEFAULT_RULES)))
        f = jax.jit(jax.value_and_grad(ep_loss, argnums=(0, 1), has_aux=True))
        assert "all_to_all" in f.lower(p, x, cot).as_text()
        (loss_ep, (h_ep, aux_ep)), grads_ep = f(p, x, cot)
    assert grads_ep[0]["w_gate"].sharding.spec[1] == "expert"
    np.testing.assert_allclose(loss_ep, loss, rtol=1e-5)
    np.testing.assert_allclose(h_ep, h, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(aux_ep, aux, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(grads_ep, grads, rtol=1e-4, atol=1e-5)  # sums in another order


def test_dropless_under_expert_mesh():
    """The dropless path has no shard_map; under an expert mesh jit partitions it, same result."""
    cfg = moe.MoEConfig(num_experts=8, top_k=2, group_size=4, dispatch="dropless")
    p = jax.tree.map(lambda a: a[0], ep_problem()[0])
    x = inputs((8, 8, D), seed=2)
    y, aux = APPLY(p, x, cfg=cfg, train=False)
    mesh = pmesh.make_mesh({"data": 2, "expert": 4})
    axes = jax.tree.map(lambda t: t[1:], moe.param_axes(cfg), is_leaf=lambda t: isinstance(t, tuple))
    with sharding.activate(mesh, DEFAULT_RULES):
        p = jax.device_put(p, sharding.tree_shardings(axes, mesh, DEFAULT_RULES))
        y_m, aux_m = jax.jit(lambda p, x: moe.apply(p, x, cfg, train=False))(p, x)
    np.testing.assert_allclose(y_m, y, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(aux_m, aux, rtol=1e-5)
