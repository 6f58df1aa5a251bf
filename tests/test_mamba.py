"""Mamba: config refusals, init statistics, the selective scan (chunked vs sequential vs float64 NumPy,
outputs and gradients, memory bound), packed segments, left padding, recurrent decoding, generation,
Hugging Face parity both ways, a few trainer steps and sharded apply/decoding."""
import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import models
from models import capture
from models import generate as G
from models import hf
from models import mamba as M
from models import mamba_ops as ops
from parallel import mesh as pmesh
from parallel import sharding
from tests.helpers import jit, rel_err
from train.config import DEFAULT_RULES

pytestmark = pytest.mark.timeout(120)

TINY = dict(vocab_size=61, d_model=16, n_layers=2, d_state=4, dtype="float32", chunk_size=4)
CFG = M.Config(**TINY)
# The defaults plus Mamba's axes; vocab replicated so that the tiny vocabulary need not divide the mesh.
RULES = tuple(r for r in DEFAULT_RULES if r[0] != "vocab") + (("vocab", None), ("inner", "tensor"), ("state", None))
PROMPTS = ((5, 17), (8, 1, 33, 60), (12, 7, 7, 30, 44, 9, 51))  # lengths 2, 4, 7: P = 8
NEW = 5


def tiny(**kw):
    return M.Config(**{**TINY, **kw})


init = jit(M.init, static_argnums=0)


@functools.cache
def params_for(cfg, seed=0):
    """Init params moved off their init values (A_log, D, dt bias, conv bias, norms) so every weight matters."""
    params = init(cfg, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    block = dict(params["layers"])
    for name in ("norm", "D"):
        block[name] = jnp.asarray(rng.uniform(0.5, 1.5, block[name].shape), jnp.float32)
    for name, scale in (("A_log", 0.3), ("dt_bias", 0.5), ("conv_b", 0.2)):
        block[name] = block[name] + jnp.asarray(scale * rng.standard_normal(block[name].shape), jnp.float32)
    final_norm = jnp.asarray(rng.uniform(0.5, 1.5, params["final_norm"].shape), jnp.float32)
    return {**params, "layers": block, "final_norm": final_norm}


# Every forward pass below is [B, S] with explicit segment ids, every cached one a [B, PREFILL] prefill or
# [B, 1] step, so each compiles once for the whole file.
B, S, PREFILL = 4, 12, 6
ONES = np.ones((B, S), np.int32)


@functools.partial(jit, static_argnames="cfg")
def forward(params, tokens, cfg, segment_ids):
    return M.apply(params, tokens, cfg, segment_ids=segment_ids)[0]


@functools.partial(jit, static_argnames="cfg")
def cached(params, tokens, cfg, cache, segment_ids):
    logits, aux = M.apply(params, tokens, cfg, segment_ids=segment_ids, cache=cache)
    return logits, aux["cache"]


def step(params, cache, tokens, cfg=CFG):
    """One decoding step for [B] tokens."""
    return cached(params, np.asarray(tokens, np.int32)[:, None], cfg, cache, np.ones((B, 1), np.int32))


def toks(b=B, s=S, seed=1, vocab=CFG.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, (b, s)).astype(np.int32)


# ----------------------------------------------------------------------------- config and init

def test_protocol_shapes_dtypes_and_axes():
    cfg = tiny(dtype="bfloat16", proj_bias=True)
    params = jax.eval_shape(lambda: M.init(cfg, jax.random.PRNGKey(0)))
    axes = M.param_axes(cfg)
    is_names = lambda x: isinstance(x, tuple)  # noqa: E731
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda _: 0, params), jax.tree.map(lambda _: 0, axes,
                                                                                         is_leaf=is_names))
    for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_names)):
        assert leaf.dtype == jnp.float32 and leaf.ndim == len(names)
    E = cfg.d_inner
    assert (cfg.dt_rank, E) == (1, 32) and params["layers"]["x_proj"].shape == (2, E, 1 + 2 * 4)
    assert params["layers"]["conv_w"].shape == (2, 4, E) and "head" not in params  # tied by default
    zeros = {name: jnp.zeros(params["layers"][name].shape) for name in ("in_x_bias", "in_z_bias", "out_bias")}
    base = params_for(CFG)
    with_bias = {**base, "layers": {**base["layers"], **zeros}}
    tokens = toks()
    def with_hidden():
        with capture.taps(hidden=True) as got:
            logits, _ = M.apply(with_bias, tokens, cfg)
        return logits, capture.stack_hidden(got.hidden)

    logits, hidden = jax.eval_shape(with_hidden)
    assert (logits.shape, logits.dtype) == ((B, S, 61), jnp.float32)
    assert (hidden.shape, hidden.dtype) == ((3, B, S, 16), jnp.bfloat16)

    def pieces(params, tokens):  # embed -> blocks -> head is apply; block() runs one layer
        x = M.embed(params, tokens, CFG)
        y, none, _ = M.blocks(params["layers"], x, CFG, positions=None)
        assert none is None
        first = jax.tree.map(lambda a: a[:1], params["layers"])
        one = M.block(jax.tree.map(lambda a: a[0], params["layers"]), x, CFG)[0]
        bf16 = M.apply({**params, "layers": {**params["layers"], **zeros}}, tokens, cfg)[0]
        return M.head(params, y, CFG), one, M.blocks(first, x, CFG)[0], bf16

    composed, one, first, bf16 = jit(pieces)(base, tokens)
    np.testing.assert_allclose(composed, forward(base, tokens, CFG, ONES), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one, first, rtol=1e-6, atol=1e-6)
    assert bf16.dtype == jnp.float32 and rel_err(bf16, composed) < 0.03  # bfloat16 compute, float32 state
    # The accounting: every projection counts, the scan adds its own term.
    proj = sum(params["layers"][k].size for k in ("in_x", "in_z", "x_proj", "dt_proj", "out_proj"))
    assert M.matmul_params(cfg) == proj + params["embed"].size
    conv_and_scan = 3 * cfg.n_layers * E * (2 * cfg.d_conv + 9 * cfg.d_state)  # forward x 3, per the docstring
    assert M.flops_per_token(cfg, 128) == 6 * M.matmul_params(cfg) + conv_and_scan == M.flops_per_token(cfg, 4096)
    assert models.get("mamba") is M


@pytest.mark.parametrize("changes,words", [
    (dict(d_state=0), "model.d_state is 0"),
    (dict(expand=0), "model.expand is 0"),
    (dict(expand=1.5), "model.expand is 1.5"),
    (dict(d_conv=-1), "model.d_conv is -1"),
    (dict(dt_min=0.0), r"model.dt_min \(0.0\) and model.dt_max \(0.1\) must satisfy 0 < dt_min <= dt_max"),
    (dict(dt_min=0.5), r"model.dt_min \(0.5\) and model.dt_max \(0.1\)"),
    (dict(dt_init_floor=-1e-4), "model.dt_init_floor is -0.0001"),
    (dict(dt_max=float("inf")), "model.dt_max is inf"),
    (dict(norm_eps=0.0), "model.norm_eps is 0.0"),
    (dict(scan="fast"), r"model.scan is 'fast'; use one of \['chunked', 'pallas', 'reference'\]"),
    (dict(chunk_size=0), "model.chunk_size is 0"),
    (dict(remat="some"), "model.remat is 'some'"),
    (dict(layer_unroll=True), "model.layer_unroll is True"),
])
def test_config_refusals_name_the_field(changes, words):
    with pytest.raises(ValueError, match=words):
        tiny(**changes)


def test_from_config_and_dt_rank_default():
    mc = ml_collections.ConfigDict(dict(family="mamba", vocab_size=61, d_model=40, n_layers=1))
    cfg = M.from_config(mc)
    assert cfg.dt_rank == 3 and cfg.d_inner == 80 and cfg.d_state == 16 and cfg.tie_embeddings
    with pytest.raises(ValueError, match="model.n_heads is not a Mamba field"):
        M.from_config({**mc.to_dict(), "n_heads": 4})


def test_init_statistics():
    p = init(CFG, jax.random.PRNGKey(0))["layers"]  # 2 layers x 32 channels
    dt = np.asarray(jax.nn.softplus(p["dt_bias"]), np.float64)
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    np.testing.assert_allclose(p["A_log"], np.broadcast_to(np.log(np.arange(1, 5)), (2, 32, 4)), rtol=1e-6)
    np.testing.assert_array_equal(p["D"], 1.0)
    np.testing.assert_array_equal(p["conv_b"], 0.0)
    assert np.abs(p["dt_proj"]).max() <= CFG.dt_rank ** -0.5 and np.abs(p["conv_w"]).max() <= 0.5
    # dt = softplus(bias) is log-uniform in [dt_min, dt_max] and floored: u = log10(dt) ~ U(-5, -2), cut at -3.
    dt = np.asarray(jax.nn.softplus(M.dt_bias_init(jax.random.PRNGKey(1), (20000,), 1e-5, 1e-2, 1e-3)), np.float64)
    floored = np.isclose(dt, 1e-3, rtol=1e-4)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-2 * (1 + 1e-5)
    assert abs(floored.mean() - 2 / 3) < 0.02
    u = np.log10(dt[~floored])  # the rest: U(-3, -2)
    assert abs(u.mean() + 2.5) < 0.02 and abs(u.std() - 12 ** -0.5) < 0.02


# ----------------------------------------------------------------------------- selective scan

def scan_inputs(b, s, E, N, seed=0, resets=True):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    dt = np.log1p(np.exp(f(b, s, E) - 3.0))  # softplus, around 0.05
    dt[:, rng.random(s) < 0.1] = 0.0  # padding-like steps: state unchanged
    reset = (rng.random((b, s)) < (0.02 if resets else 0.0))
    A = -np.exp(0.5 * f(E, N)) - 0.1
    return dict(x=f(b, s, E), dt=dt, A=A, B=f(b, s, N), C=f(b, s, N), D=f(E), reset=reset, h0=f(b, E, N))


def numpy_scan(x, dt, A, B, C, D, reset, h0):
    """The recurrence in float64, one step at a time."""
    x, dt, A, B, C, D, h = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, h0))
    ys = []
    for t in range(x.shape[1]):
        decay = np.exp(dt[:, t, :, None] * A) * (1.0 - reset[:, t, None, None])
        h = decay * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(np.einsum("ben,bn->be", h, C[:, t]) + D * x[:, t])
    return np.stack(ys, axis=1), h


@pytest.mark.parametrize("method", ["reference", "chunked"])
def test_scan_matches_float64_numpy(method):
    inp = scan_inputs(2, 13, 3, 2, seed=1)
    y, h = M.selective_scan(**inp, method=method, chunk_size=4)  # 13 = 3 chunks of 4 + 1
    y64, h64 = numpy_scan(**inp)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, h64, rtol=1e-5, atol=1e-6)


def _walk(jaxpr):
    """Every intermediate value's aval in a jaxpr and the jaxprs nested in its equations (scan, remat...)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _walk(sub)


def test_chunked_scan_equals_reference_outputs_and_gradients_long_sequence():
    b, s, E, N, chunk = 2, 1100, 6, 4, 64  # 1100 = 17 chunks of 64 + 12: padded
    inp = scan_inputs(b, s, E, N, seed=2)
    reset = jnp.asarray(inp.pop("reset"))
    w_y, w_h = (np.random.default_rng(3).standard_normal(shape).astype(np.float32) for shape in ((b, s, E), (b, E, N)))

    def loss(args, method):
        y, h = M.selective_scan(**args, reset=reset, method=method, chunk_size=chunk)
        return jnp.sum(y * w_y) + jnp.sum(h * w_h), (y, h)

    grad = {m: jit(jax.grad(functools.partial(loss, method=m), has_aux=True)) for m in ("reference", "chunked")}
    (g_ref, (y_ref, h_ref)), (g_fast, (y_fast, h_fast)) = grad["reference"](inp), grad["chunked"](inp)
    np.testing.assert_allclose(y_fast, y_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h_fast, h_ref, rtol=2e-5, atol=2e-5)
    for name in inp:
        assert rel_err(g_fast[name], g_ref[name]) < 1e-5, name  # measured <= 1.2e-6 (A), ~1e-7 others
    # Never the whole [b, s, E, N] state tensor at once, forward or backward: only one chunk's.
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, method="chunked"), has_aux=True))(inp).jaxpr
    biggest = max(math.prod(a.shape) for a in _walk(jaxpr) if hasattr(a, "shape"))
    assert biggest < b * s * E * N


# ----------------------------------------------------------------------------- segments and padding

@pytest.mark.parametrize("K", [1, 2, 4])
def test_causal_conv_with_a_buffer_equals_float64(K):
    """causal_conv over a cached buffer (taps built from the buffer's rows and slices of x, never one copy of
    both) against a float64 loop over buffer ++ x, for inputs shorter and longer than the buffer, with runs:
    the outputs and the new buffer (zero where it holds an earlier run than the last token)."""
    rng = np.random.default_rng(K)
    b, E = 2, 5
    for s in (1, K - 1, K + 3):
        x, buf = rng.normal(size=(b, s, E)), rng.normal(size=(b, K - 1, E))
        w, bias = rng.normal(size=(K, E)), rng.normal(size=(E,))
        run = np.cumsum(rng.random((b, s)) < 0.4, axis=1)
        out, new_buf = ops.causal_conv(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                       jnp.asarray(bias, jnp.float32), run=jnp.asarray(run, jnp.int32),
                                       buffer=jnp.asarray(buf, jnp.float32))
        ext, run_ext = np.concatenate([buf, x], 1), np.concatenate([np.zeros((b, K - 1), int), run], 1)
        want = np.tile(bias, (b, s, 1))
        for t in range(s):
            for k in range(K):
                same = (run_ext[:, t + k] == run[:, t])[:, None]
                want[:, t] += np.where(same, w[k] * ext[:, t + k], 0.0)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        want_buf = np.where((run_ext[:, s:] == run[:, -1:])[..., None], ext[:, s:], 0.0)
        np.testing.assert_allclose(new_buf, want_buf, rtol=1e-6, atol=1e-6)


def test_conv_silu_and_gate_have_autodiff_gradients():
    """mamba_ops' conv_silu and gate, whose backward passes are written by hand, against autodiff of the
    plain formulas (causal_conv then silu; (y + D x) silu(z)): float32 to rounding, with packed segments
    (taps never cross a segment, in either direction) and without a bias; bf16 inputs give bf16 gradients
    within 1e-2 of the float32 ones (bf16 rounding: about 4e-3)."""
    rng = np.random.default_rng(0)
    b, s, E, K = 2, 11, 6, 4
    x, g, y, z = (jnp.asarray(rng.standard_normal((b, s, E)), jnp.float32) for _ in range(4))
    w, bias, D = jnp.asarray(rng.standard_normal((K, E)), jnp.float32), *(jnp.asarray(
        rng.standard_normal(E), jnp.float32) for _ in range(2))
    run = ops.segment_info(jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 3, 3, 3], [0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2]]))[2]

    def plain_conv(x, w, bias, run):
        return jax.nn.silu(ops.causal_conv(x, w, bias, run=run)[0]).astype(x.dtype)

    def vjp(f, *args):
        out, back = jax.vjp(f, *args)
        return out, back(g.astype(out.dtype))

    for r in (run, None):
        for bb in (bias, None):
            got = vjp(lambda x, w, bb, r=r: ops.conv_silu(x, w, bb, r), x, w, bb)
            want = vjp(lambda x, w, bb, r=r: plain_conv(x, w, bb, r), x, w, bb)
            chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    # The segments matter: without them the gradients differ.
    assert rel_err(vjp(lambda x: ops.conv_silu(x, w, bias, run), x)[1][0],
                   vjp(lambda x: ops.conv_silu(x, w, bias, None), x)[1][0]) > 1e-2
    got = vjp(ops.gate, y, x, z, D)
    want = vjp(lambda y, x, z, D: (y + D * x) * jax.nn.silu(z), y, x, z, D)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    out, grads = vjp(lambda x: ops.conv_silu(x, w, bias, run), bf(x))
    assert out.dtype == grads[0].dtype == jnp.bfloat16
    assert rel_err(grads[0], vjp(lambda x: plain_conv(x, w, bias, run), x)[1][0]) < 1e-2
    out, grads = vjp(ops.gate, bf(y), bf(x), bf(z), D)
    assert [a.dtype for a in (out, *grads)] == [jnp.bfloat16] * 4 + [jnp.float32]
    assert max(rel_err(a, e) for a, e in zip(grads, want[1])) < 1e-2


def test_packed_segments_reset_state_and_conv():
    params = params_for(CFG)
    a, b = toks(1, 7, seed=4)[0], toks(1, 5, seed=5)[0]
    tokens = np.zeros((B, S), np.int32)
    seg = np.zeros((B, S), np.int32)
    tokens[0], seg[0] = np.r_[a, b], [1] * 7 + [2] * 5  # packed
    tokens[1, :5], seg[1, :5] = b, 1  # b alone, right-padded
    tokens[2, :7], seg[2, :7] = a, 1
    tokens[3], seg[3] = np.r_[b, a], [5] * 5 + [9] * 7  # any ids
    got = forward(params, tokens, CFG, seg)
    np.testing.assert_allclose(got[0, 7:], got[1, :5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0, :7], got[2, :7], rtol=1e-5, atol=1e-6)
    assert rel_err(got[0, 7:], forward(params, tokens, CFG, ONES)[0, 7:]) > 1e-2  # without ids they would mix
    np.testing.assert_allclose(got[3, 5:], got[2, :7], rtol=1e-5, atol=1e-6)
    ref = forward(params, tokens, dataclasses.replace(CFG, scan="reference"), seg)  # both scans agree
    np.testing.assert_allclose(ref, got, rtol=1e-5, atol=1e-6)


def prefill_steps(params, prompts, seg=None):
    """Logits and cache of a [B, PREFILL] prefill, and of the same tokens fed one step at a time."""
    seg = np.ones((B, PREFILL), np.int32) if seg is None else seg
    logits, cache = cached(params, prompts, CFG, M.init_cache(CFG, B, 64), seg)
    one = M.init_cache(CFG, B)
    steps = []
    for t in range(PREFILL):
        out, one = cached(params, prompts[:, t:t + 1], CFG, one, seg[:, t:t + 1])
        steps.append(out)
    return (logits, cache), (np.concatenate(steps, axis=1), one)


def test_left_padding_leaves_state_and_logits_unchanged():
    params = params_for(CFG)
    real = toks(B, 4, seed=6)
    padded = np.concatenate([np.full((B, 2), 9, np.int32), real], axis=1)  # pad id 9, not 0: it must not matter
    seg = np.array([[0, 0, 1, 1, 1, 1]] * B)
    (logits, cache), (steps, stepped) = prefill_steps(params, padded, seg)  # padding as a prefill, or as steps
    np.testing.assert_allclose(steps[:, 2:], logits[:, 2:], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(stepped, cache, rtol=1e-5, atol=1e-6)
    # The unpadded prompts, one token at a time.
    alone = M.init_cache(CFG, B)
    for t in range(4):
        out, alone = step(params, alone, real[:, t])
        np.testing.assert_allclose(logits[:, 2 + t], out[:, 0], rtol=1e-5, atol=1e-6)
    for name in ("conv", "ssm", "segment"):
        np.testing.assert_allclose(cache[name], alone[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(cache["index"]) == 6 and int(alone["index"]) == 4


# ----------------------------------------------------------------------------- decoding

def test_step_decoding_equals_full_forward():
    params, tokens = params_for(CFG), toks(seed=7)
    full = forward(params, tokens, CFG, ONES)
    (logits, cache), (steps, _) = prefill_steps(params, tokens[:, :PREFILL])  # multi-token prefill, and steps
    np.testing.assert_allclose(steps, full[:, :PREFILL], rtol=1e-5, atol=1e-6)
    outs = [logits]
    for t in range(PREFILL, S):
        out, cache = step(params, cache, tokens[:, t])
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-6)
    assert int(cache["index"]) == S and cache["ssm"].dtype == jnp.float32
    chex.assert_shape([cache["conv"], cache["ssm"], cache["segment"]], [(2, B, 3, 32), (2, B, 32, 4), (B,)])
    # A new segment id in a cached call starts from scratch.
    logits, _ = cached(params, tokens[:, :PREFILL], CFG, cache, np.full((B, PREFILL), 2, np.int32))
    np.testing.assert_allclose(logits, full[:, :PREFILL], rtol=1e-5, atol=1e-6)


def naive_greedy(params, prompts, n):
    """Greedy by the full forward pass on the growing sequences, right-padded to [B, S] (causal)."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        batch = np.zeros((B, S), np.int32)
        for row, seq in enumerate(seqs):
            batch[row, :len(seq)] = seq
        logits = np.asarray(forward(params, batch, CFG, ONES))
        for row, seq in enumerate(seqs):
            seq.append(int(np.argmax(logits[row, len(seq) - 1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_generate_greedy_and_sample_with_left_padded_prompts():
    params = params_for(CFG)
    want = naive_greedy(params, PROMPTS, NEW)
    assert G.greedy(M, params, CFG, PROMPTS, max_new_tokens=NEW) == want
    sampled = G.sample(M, params, CFG, PROMPTS, max_new_tokens=NEW, rng=3)
    assert sampled == G.sample(M, params, CFG, PROMPTS, max_new_tokens=NEW, rng=3)
    assert G.sample(M, params, CFG, PROMPTS, max_new_tokens=NEW, rng=3, top_k=1) == want


# ----------------------------------------------------------------------------- Hugging Face

def hf_mamba(tie: bool, bias: bool, seed: int = 0):
    """A random tiny MambaForCausalLM with A_log, D, dt bias, conv bias and norms moved off their init."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    conf = transformers.MambaConfig(vocab_size=61, hidden_size=24, state_size=4, num_hidden_layers=2,
                                    expand=2, conv_kernel=3, tie_word_embeddings=tie, use_bias=bias,
                                    use_conv_bias=not bias, time_step_rank=3)
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith(".D") or "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3) if "dt_proj" not in name else p.add_(0.5 * torch.randn_like(p))
            elif "embeddings" in name or "lm_head" in name:
                p.normal_(0.0, 24 ** -0.5)
    return model


def torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_hugging_face_parity_both_ways(tmp_path, tie, bias):
    transformers = pytest.importorskip("transformers")
    model = hf_mamba(tie, bias)
    cfg = hf.config_from_hf(model.config.to_dict(), dtype="float32")
    assert isinstance(cfg, M.Config)
    assert (cfg.d_inner, cfg.d_conv, cfg.dt_rank, cfg.tie_embeddings, cfg.proj_bias, cfg.conv_bias) == (
        48, 3, 3, tie, bias, not bias)
    tokens = toks(seed=8)
    theirs = torch_logits(model, tokens)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = hf.from_hf_state_dict(state, cfg)
    ours = forward(params, tokens, cfg, ONES)
    err = rel_err(ours, theirs)
    assert err <= 1e-5, err  # measured about 1.2e-7
    # Their checkpoint directory, through models/hf.py.
    model.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    loaded, cfg2, tok = hf.load_checkpoint(tmp_path / "theirs")
    assert cfg2 == cfg and tok is None
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, params))
    # loom -> their format: state dict round trip and a directory transformers loads.
    back = hf.to_hf_state_dict(params, cfg)
    assert back.keys() == {k for k in state if not (tie and k == "lm_head.weight")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    hf.save_checkpoint(params, cfg, tmp_path / "ours")
    again = transformers.MambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(again, tokens), theirs, rtol=1e-6, atol=1e-6)


def mamba_json(**changes):
    return {**hf.mamba_config(CFG), **changes}


@pytest.mark.parametrize("changes,words", [
    (dict(architectures=["MambaModel"]), "architectures holds 'MambaModel'"),
    (dict(hidden_act="gelu"), "hidden_act is 'gelu'"),
    (dict(expand=1.5, intermediate_size=24), "expand is 1.5"),
    (dict(intermediate_size=40), r"intermediate_size is 40, not expand \* hidden_size = 32"),
    (dict(state_size=0), "model.d_state is 0"),
    (dict(model_type="mamba2"), r"model_type is 'mamba2'; loom loads only \['llama', 'mamba', 'mistral'\]"),
])
def test_hf_config_refusals_name_the_field(changes, words):
    with pytest.raises(ValueError, match=words):
        hf.config_from_hf(mamba_json(**changes))


def test_hf_config_round_trip_and_auto_rank():
    assert hf.config_from_hf(mamba_json(), dtype="float32", chunk_size=4) == CFG
    auto = hf.config_from_hf({k: v for k, v in mamba_json(time_step_rank="auto", hidden_size=40).items()
                              if k != "intermediate_size"})
    assert auto.dt_rank == 3 and auto.d_inner == 80 and auto.dtype == "bfloat16"


def test_checkpoint_directory_round_trip_without_torch(tmp_path):
    pytest.importorskip("safetensors")
    cfg = tiny(tie_embeddings=False, proj_bias=True)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                          jax.eval_shape(lambda: M.init(cfg, jax.random.PRNGKey(0))))
    hf.save_checkpoint(params, cfg, tmp_path, max_shard_bytes=4096)
    loaded, cfg2, _ = hf.load_checkpoint(tmp_path, chunk_size=4)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(loaded, params)


# ----------------------------------------------------------------------------- trainer and sharding

@pytest.mark.timeout(240)
def test_trainer_runs_mamba_and_loss_decreases(tmp_path):
    from experiments import arith_cot
    from train import metrics, trainer

    c = arith_cot.get_config()
    c.model = ml_collections.ConfigDict(dict(family="mamba", vocab_size=259, d_model=32, n_layers=2, d_state=8,
                                             dtype="float32", chunk_size=16))
    c.data.max_steps = 3
    c.train.update(steps=6, batch_size=8, seq_len=48, log_every=1, eval_every=0, exact_match_every=0,
                   ckpt_every=6, progress=False)
    c.optim.warmup_steps = 2
    trainer.run(c, str(tmp_path))
    recorded = {r["step"]: r["loss"] for r in metrics.read_jsonl(str(tmp_path)) if "loss" in r}
    assert sorted(recorded) == list(range(1, 7)) and recorded[6] < recorded[1] - 0.1


def test_sharded_apply_and_decoding_equal_one_device():
    mesh = pmesh.make_mesh({"data": 2, "tensor": 4})
    params = params_for(CFG)
    tokens = toks(seed=9)
    seg = np.array([[1] * 12, [1] * 4 + [2] * 8, [0] * 3 + [1] * 9, [1] * 8 + [0] * 4])
    want = forward(params, tokens, CFG, seg)
    greedy = G.greedy(M, params, CFG, PROMPTS, max_new_tokens=NEW)
    placed = jax.device_put(params, sharding.tree_shardings(M.param_axes(CFG), mesh, RULES))
    assert placed["layers"]["in_x"].sharding.spec == P("stage", "fsdp", "tensor")
    assert placed["layers"]["A_log"].sharding.spec == P("stage", "tensor", None)
    with sharding.activate(mesh, RULES):
        got = jit(lambda p, t, s: M.apply(p, t, CFG, segment_ids=s)[0])(placed, tokens, seg)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert G.greedy(M, placed, CFG, PROMPTS, max_new_tokens=NEW) == greedy
