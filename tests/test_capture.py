"""Activation capture (models/capture.py) under jit: every linear's input statistics against NumPy
statistics of the inputs recomputed by hand from the block math, per expert for Switch layers, and every
layer's hidden state against running the layers one by one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import capture, layers, moe
from models import mamba as M
from models import transformer as T
from tests import helpers

pytestmark = pytest.mark.timeout(200)

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 model against float64 NumPy, values O(1)


def f64(a):
    return np.asarray(a, np.float64)


def stats(rows):
    """absmax and mean |x| per channel over every row of [..., d], float64."""
    a = np.abs(f64(rows)).reshape(-1, np.shape(rows)[-1])
    return {"absmax": a.max(0), "mean_abs": a.mean(0)}


def check(got, want, key):
    for s in ("absmax", "mean_abs"):
        assert got[key][s].dtype == jnp.float32, key
        np.testing.assert_allclose(got[key][s], want[s], **TOL, err_msg=f"{key} {s}")


def rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * f64(scale)


def silu(x):
    return x / (1 + np.exp(-x))


def rope(x, pos, theta):
    d = x.shape[-1]
    ang = pos[..., None] * (1.0 / theta ** (np.arange(0, d, 2) / d))  # [b, s, d/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attention_out(p, n, cfg):
    """W_o's input: causal GQA attention of RoPE(n W_q), RoPE(n W_k), n W_v, float64 [b, s, heads * head_dim]."""
    b, s, _ = n.shape
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.float64)
    q = rope((n @ f64(p["wq"])).reshape(b, s, H, D), pos, cfg.rope_theta)
    k = rope((n @ f64(p["wk"])).reshape(b, s, K, D), pos, cfg.rope_theta)
    v = (n @ f64(p["wv"])).reshape(b, s, K, D)
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    logits = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(D)
    logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", probs, v).reshape(b, s, H * D)


@pytest.fixture(scope="module")
def dense():
    cfg = helpers.tiny("transformer", n_layers=3)
    params, toks = helpers.random_params(cfg), helpers.tokens(61, s=10)

    @helpers.jit
    def run(params, toks):
        with capture.taps(linears=True, hidden=True) as got:
            logits, _ = T.apply(params, toks, cfg)
        return logits, got.linears, got.hidden

    return cfg, params, toks, run(params, toks), helpers.jit(lambda p, t: T.apply(p, t, cfg)[0])(params, toks)


def test_dense_linear_inputs_and_hidden_states_equal_numpy(dense):
    cfg, params, toks, (logits, lin, hidden), plain = dense
    np.testing.assert_allclose(logits, plain, **TOL)  # the capture's unrolled layers compute the same logits
    assert set(hidden) == {f"layer{i}" for i in range(cfg.n_layers + 1)}
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    assert set(lin) == {f"layer{i}/{n}" for i in range(cfg.n_layers) for n in names} | {"head"}
    x = f64(params["embed"])[np.asarray(toks)]
    for i in range(cfg.n_layers):
        p = jax.tree.map(lambda a: a[i], params["layers"])
        np.testing.assert_allclose(hidden[f"layer{i}"], x, **TOL)
        n = rms(x, p["attn_norm"], cfg.norm_eps)
        for w in ("wq", "wk", "wv"):
            check(lin, stats(n), f"layer{i}/{w}")
        o = attention_out(p, n, cfg)
        check(lin, stats(o), f"layer{i}/wo")
        h = x + o @ f64(p["wo"])
        n = rms(h, p["mlp_norm"], cfg.norm_eps)
        check(lin, stats(n), f"layer{i}/w_gate")
        check(lin, stats(n), f"layer{i}/w_up")
        mid = silu(n @ f64(p["w_gate"])) * (n @ f64(p["w_up"]))
        check(lin, stats(mid), f"layer{i}/w_down")
        x = h + mid @ f64(p["w_down"])
    np.testing.assert_allclose(hidden[f"layer{cfg.n_layers}"], x, **TOL)
    check(lin, stats(rms(x, params["final_norm"], cfg.norm_eps)), "head")


def test_hidden_states_equal_running_the_layers_one_by_one(dense):
    cfg, params, toks, (_, _, hidden), _ = dense
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    x = T.embed(params, toks, cfg)
    for i in range(cfg.n_layers):  # float32 rounding apart: one jitted program against op by op
        np.testing.assert_allclose(hidden[f"layer{i}"], x, **TOL)
        x = T.block(jax.tree.map(lambda a: a[i], params["layers"]), x, cfg, positions=pos)[0]
    np.testing.assert_allclose(hidden[f"layer{cfg.n_layers}"], x, **TOL)
    np.testing.assert_array_equal(capture.stack_hidden(hidden)[1], hidden["layer1"])


def test_mamba_linear_inputs_and_hidden_states():
    cfg = helpers.tiny("mamba", n_layers=2, tie_embeddings=False)
    params, toks = helpers.random_params(cfg), helpers.tokens(61, s=10)

    @helpers.jit
    def run(params, toks):
        with capture.taps(linears=True, hidden=True) as got:
            logits, _ = M.apply(params, toks, cfg)
        return logits, got.linears, got.hidden, M.apply(params, toks, cfg)[0]

    logits, lin, hidden, plain = run(params, toks)
    np.testing.assert_allclose(logits, plain, **TOL)
    names = ("in_x", "in_z", "x_proj", "dt_proj", "out_proj")
    assert set(lin) == {f"layer{i}/{n}" for i in range(2) for n in names} | {"head"}
    R, N = cfg.dt_rank, cfg.d_state
    x = M.embed(params, toks, cfg)
    for i in range(cfg.n_layers):
        p = jax.tree.map(lambda a: a[i], params["layers"])
        np.testing.assert_allclose(hidden[f"layer{i}"], x, **TOL)
        n = rms(f64(x), p["norm"], cfg.norm_eps)
        check(lin, stats(n), f"layer{i}/in_x")
        check(lin, stats(n), f"layer{i}/in_z")
        xi, z = n @ f64(p["in_x"]), n @ f64(p["in_z"])
        K = cfg.d_conv  # causal depthwise conv, zeros before the sequence
        padded = np.concatenate([np.zeros((2, K - 1, xi.shape[-1])), xi], 1)
        xc = silu(sum(padded[:, k:k + 10] * f64(p["conv_w"][k]) for k in range(K)) + f64(p["conv_b"]))
        check(lin, stats(xc), f"layer{i}/x_proj")
        dbc = xc @ f64(p["x_proj"])
        check(lin, stats(dbc[..., :R]), f"layer{i}/dt_proj")
        dt = np.logaddexp(0, dbc[..., :R] @ f64(p["dt_proj"]) + f64(p["dt_bias"]))
        y, _ = M.selective_scan(xc, dt, -jnp.exp(p["A_log"]), dbc[..., R:R + N], dbc[..., R + N:], p["D"],
                                method="reference")
        gated = f64(y) * silu(z)
        check(lin, stats(gated), f"layer{i}/out_proj")
        x = M.block(p, x, cfg)[0]
    np.testing.assert_allclose(hidden["layer2"], x, **TOL)
    check(lin, stats(rms(f64(x), params["final_norm"], cfg.norm_eps)), "head")


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_switch_expert_inputs_per_expert(dispatch):
    """Per expert e: w_gate/w_up see the normed tokens routed to e and kept (capacity), w_down their SwiGLU
    hidden; statistics [num_experts, in] over those tokens (0 for an expert that got none)."""
    cfg = helpers.tiny("switch", n_layers=4, moe_dispatch=dispatch, moe_capacity_factor_eval=1.0)
    params, toks = helpers.random_params(cfg), helpers.tokens(61, s=8)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))

    @helpers.jit
    def run(params, toks):
        with capture.taps(linears=True, hidden=True) as got:
            logits, aux = T.apply(params, toks, cfg)
        return logits, aux, got.linears, got.hidden, T.apply(params, toks, cfg)

    logits, aux, lin, hidden, (plain, plain_aux) = run(params, toks)
    np.testing.assert_allclose(logits, plain, **TOL)
    np.testing.assert_allclose(aux["losses"]["moe/loss"], plain_aux["losses"]["moe/loss"], rtol=1e-5)
    assert {k for k in lin if k.startswith("layer1/")} == {
        f"layer1/{n}" for n in ("wq", "wk", "wv", "wo", "router", "w_gate", "w_up", "w_down")}
    E, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    dropped = []
    for i in (1, 3):
        u = i // 2
        p = jax.tree.map(lambda a: a[u], params["layers"]["moe"])
        x = hidden[f"layer{i}"]
        np.testing.assert_allclose(  # the dense layer before it, run alone
            T.decoder_layer(jax.tree.map(lambda a: a[u, 0], params["layers"]["dense"]), hidden[f"layer{i - 1}"], cfg,
                            positions=pos)[0], x, **TOL)
        attn_only = {k: v for k, v in p.items() if k not in ("router", *moe.EXPERT_WEIGHTS)}
        attn_only.update(w_gate=jnp.zeros((d, f)), w_up=jnp.zeros((d, f)), w_down=jnp.zeros((f, d)))
        h = T.decoder_layer(attn_only, x, cfg, positions=pos)[0]
        n = layers.rms_norm(h, p["mlp_norm"], cfg.norm_eps)
        check(lin, stats(n), f"layer{i}/router")
        group = cfg.moe_group_size
        cap = moe.capacity(cfg.moe, group, train=False) if dispatch == "capacity" else None
        r = moe.route(p["router"], n.reshape(-1, group, d), cfg.moe, cap)
        rows = f64(n).reshape(-1, d)
        expert, keep = np.asarray(r.experts).reshape(-1), np.asarray(r.keep).reshape(-1)  # top-1
        dropped.append(1 - keep.mean())
        want_in, want_hid = {s: np.zeros((E, d)) for s in ("absmax", "mean_abs")}, \
            {s: np.zeros((E, f)) for s in ("absmax", "mean_abs")}
        for e in range(E):
            mine = rows[(expert == e) & keep]
            if len(mine):
                hid = silu(mine @ f64(p["w_gate"][e])) * (mine @ f64(p["w_up"][e]))
                for s in ("absmax", "mean_abs"):
                    want_in[s][e], want_hid[s][e] = stats(mine)[s], stats(hid)[s]
        check(lin, want_in, f"layer{i}/w_gate")
        check(lin, want_in, f"layer{i}/w_up")
        check(lin, want_hid, f"layer{i}/w_down")
    if dispatch == "capacity":
        assert max(dropped) > 0  # capacity factor 1: dropped tokens are not an expert's input
    else:
        assert max(dropped) == 0


def test_capture_records_each_name_once_and_only_while_open():
    cfg = helpers.tiny("transformer")
    params, toks = helpers.random_params(cfg), helpers.tokens(61, s=4)
    with capture.taps(linears=True) as got:
        jax.eval_shape(lambda: T.apply(params, toks, cfg))
        assert not got.hidden and "layer0/wq" in got.linears
        with pytest.raises(ValueError, match="recorded twice"):
            jax.eval_shape(lambda: T.apply(params, toks, cfg))
    assert not capture.active()
    with capture.taps(hidden=True) as got:  # hidden states only, for a slice of the stack with its layer ids
        jax.eval_shape(lambda: T.blocks(jax.tree.map(lambda a: a[1:], params["layers"]), T.embed(params, toks, cfg),
                                        cfg, positions=jnp.broadcast_to(jnp.arange(4), (2, 4)),
                                        layer_ids=np.array([1])))
    assert set(got.hidden) == {"layer1", "layer2"} and not got.linears
    assert models.get("mamba").blocks is M.blocks
