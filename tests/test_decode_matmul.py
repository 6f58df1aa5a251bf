"""The batch-1 decoding kernels (Pallas, interpreted on CPU) against float64 references: the [K, N] product (bf16,
fp16, float32 output), the out-major product with its norm, SwiGLU and residual, and ``decode_qkv`` (norm, rotation,
cache writes in place); the shapes and tiles they refuse; ``layers.linear``'s dispatch to the product on a GPU
(traced) and not under a mesh, and its gradient there; the Transformer's six-kernel layer (``model.decode``) and
greedy decoding through the kernels; the Triton lowerings for an H200."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses
import functools
import re

from models import decode_matmul as DM
from models import awq, layers, weights
from models.weights import Dot
from parallel import mesh as pmesh
from parallel import sharding
from parallel.sharding import DEFAULT_RULES
from tests.helpers import h200, rel_err

pytestmark = pytest.mark.timeout(120)


def operands(m, k, n, dtype, seed=0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (m, k), dtype), jax.random.normal(kw, (k, n), dtype)


@pytest.mark.parametrize("k, n, dtype, out", [(512, 3072, jnp.bfloat16, None), (256, 4096, jnp.float16, None),
                                              (768, 3072, jnp.bfloat16, jnp.float32)])
def test_kernel_equals_float64_product(k, n, dtype, out):
    x, w = operands(1, k, n, dtype, seed=k)
    y = DM.decode_matmul(x.reshape(1, 1, k), w, out, interpret=True, block_n=512)  # fewer programs: quicker
    assert y.shape == (1, 1, n) and y.dtype == (out or dtype)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # float32 accumulation, then the output rounded: bf16 ~ 2e-3, fp16 ~ 3e-4, float32 ~ 1e-7
    tol = {jnp.bfloat16: 4e-3, jnp.float16: 5e-4, jnp.float32: 1e-6}[jnp.dtype(out or dtype).type]
    assert rel_err(y.reshape(1, n), ref) < tol


def test_plan_takes_one_wide_row_only():
    assert DM.plan(1, 2048, 11264, jnp.bfloat16) == dict(block_n=64, block_k=256, num_warps=4, num_stages=3)
    assert DM.plan(1, 2048, 4096, jnp.bfloat16)["block_n"] == 32  # 64 programs of 64 columns: too few
    for m, k, n, dtype in ((16, 1024, 4096, jnp.bfloat16),  # more rows: XLA's GEMM (the kernel did not pay)
                           (1, 2048, 2048, jnp.bfloat16),   # narrow: XLA splits K
                           (1, 1024, 4096, jnp.float32),    # float32: XLA
                           (1, 1000, 4096, jnp.bfloat16)):  # K not a multiple of the K tile
        assert DM.plan(m, k, n, dtype) is None, (m, k, n, dtype)
        x, w = operands(m, k, n, dtype)
        assert not DM.takes(x, w)
        with pytest.raises(ValueError, match="decode_matmul takes one bf16/fp16 row"):
            DM.decode_matmul(x, w, interpret=True)
    x, w = operands(1, 1024, 4096, jnp.bfloat16)
    assert DM.takes(x, w) and not DM.takes(x, w.astype(jnp.float16))  # x and w of one dtype


def test_linear_through_the_kernel_has_the_mixed_precision_gradient(monkeypatch):
    """``layers.linear`` through the kernel (traced as on a GPU, interpreted) differentiates with linear's one
    backward (the cotangent in x's dtype, float32-accumulated matmuls): the same gradients as XLA's product
    (autodiff has no rule for the kernel itself)."""
    x, w = operands(1, 256, 3072, jnp.bfloat16, seed=3)
    g = jax.random.normal(jax.random.PRNGKey(4), (1, 3072), jnp.float32)

    def grads():
        loss = lambda x, w: jnp.sum(layers.linear(w, x, out_dtype=jnp.float32) * g)  # noqa: E731
        return jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w), jax.grad(loss, (0, 1))(x, w)

    ref_jaxpr, ref = grads()
    monkeypatch.setattr(DM, "MIN_N", 0)
    monkeypatch.setattr(layers, "decode_kernels", lambda: True)
    got_jaxpr, got = grads()
    assert "decode_matmul_256x3072" in str(got_jaxpr) and "pallas_call" not in str(ref_jaxpr)
    for a, b in zip(got, ref):  # one backward from the same residuals: the same numbers
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_linear_takes_the_kernel_on_gpu_without_a_mesh(monkeypatch):
    """Traced as on a GPU: a wide one-row product is one pallas_call; a narrow one, more rows, a prefill or a
    transposed (tied head) product is XLA's; under an active mesh XLA's (GSPMD cannot split the kernel)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    w = jnp.zeros((1024, 4096), jnp.bfloat16)

    def kernels(x, w, **kw):
        return str(jax.make_jaxpr(lambda x, w: layers.plain_dot(Dot("dense", **kw), x, w))(x, w)).count("pallas_call")

    assert kernels(jnp.zeros((1, 1, 1024), jnp.bfloat16), w) == 1
    assert kernels(jnp.zeros((1, 1024), jnp.bfloat16), w, out_dtype=jnp.float32) == 1
    assert kernels(jnp.zeros((64, 1, 1024), jnp.bfloat16), w) == 0
    assert kernels(jnp.zeros((1, 512, 1024), jnp.bfloat16), w) == 0
    assert kernels(jnp.zeros((1, 1, 1024), jnp.bfloat16), w[:, :1024]) == 0
    assert kernels(jnp.zeros((1, 1, 4096), jnp.bfloat16), w, transpose=True) == 0
    mesh = pmesh.make_mesh({"data": 2}, jax.devices()[:2])
    with sharding.activate(mesh, DEFAULT_RULES):
        assert kernels(jnp.zeros((1, 1, 1024), jnp.bfloat16), w) == 0


def test_triton_lowering_for_cuda_without_a_gpu():
    """The 1.26B config's batch-1 W_qkv, W_gate_up and LM head lower to one Triton call each for an H200."""
    sd = jax.ShapeDtypeStruct
    for m, k, n in ((1, 2048, 6144), (1, 2048, 11264), (1, 2048, 32000)):
        with h200():
            text = jax.jit(lambda x, w: DM.decode_matmul(x, w, interpret=False)).trace(
                sd((m, k), jnp.bfloat16), sd((k, n), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1, (m, k, n)


@pytest.mark.parametrize("family", ["transformer", "mamba"])
def test_decoding_through_the_kernels_follows_xla(family, monkeypatch):
    """A tiny bf16 model's batch-1 decoding as on a GPU (interpreted; the plan's width floor lowered to the tiny
    sizes): "auto" takes the Transformer's six-kernel layer and Mamba's [K, N] kernel, a cached step's logits agree
    with XLA's within bf16, and Mamba's greedy tokens are XLA's (the Transformer's greedy decoding, which rounds in
    other places, is checked in ``test_fused_decode_layer_equals_the_op_by_op_step``)."""
    import models
    from models import generate as G
    from tests import helpers

    model = models.get(family)
    extra = dict(d_ff=512, n_heads=4, n_kv_heads=4) if family == "transformer" else {}
    cfg = helpers.tiny(family, d_model=256, vocab_size=64, dtype="bfloat16", **extra)
    params = helpers.random_params(cfg)
    prompts = ((5, 17, 3, 9),)
    want = G.greedy(model, params, cfg, prompts, max_new_tokens=4) if family == "mamba" else None
    step = (lambda p, t, c: model.apply(p, t, cfg, cache=c)[0])
    dp, tok, cache = model.decode_params(params, cfg), jnp.array([[7]]), model.init_cache(cfg, 1, 16)
    ref = step(dp, tok, cache)
    monkeypatch.setattr(DM, "MIN_N", 0)
    monkeypatch.setattr(layers, "decode_kernels", lambda: True)
    jax.clear_caches()
    dp = model.decode_params(params, cfg, batch=1)  # on a GPU the Transformer's batch-1 layout is out-major
    jaxpr = str(jax.make_jaxpr(step)(dp, tok, cache))
    # per layer the Transformer's six-kernel layer (decode_qkv and three out-major products) or Mamba's in_xz,
    # out_proj; and an untied LM head (a tied one multiplies by the embedding's transpose: XLA)
    assert jaxpr.count("name=decode_matmul_") == (3 if family == "transformer" else 2) * cfg.n_layers + (
        not cfg.tie_embeddings)
    assert jaxpr.count("name=decode_qkv_") == (cfg.n_layers if family == "transformer" else 0)
    assert rel_err(step(dp, tok, cache), ref) < 1e-2
    if family == "mamba":
        assert G.greedy(model, params, cfg, prompts, max_new_tokens=4) == want
    jax.clear_caches()


def assert_near_argmax(model, params, cfg, prompt, tokens, tol: float = 0.03):
    """Each of ``tokens`` (generated after ``prompt``) is the argmax of ``cfg``'s forward over the sequence up to
    it, up to rounding: its logit is within ``tol`` x the logits' RMS of the largest. A wrong token lies about one
    RMS below; two paths that round differently may swap near ties, which exact token equality would call a
    failure."""
    seq = jnp.array([list(prompt) + list(tokens[:-1])])
    logits = np.asarray(model.apply(params, seq, cfg)[0][0, len(prompt) - 1:], np.float64)
    chosen = logits[np.arange(len(tokens)), np.asarray(tokens)]
    gap = logits.max(-1) - chosen
    assert (gap <= tol * np.sqrt(np.mean(logits ** 2, -1))).all(), (tokens, gap)


def out_major_operands(k, n, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(ks[0], (1, 1, k), jnp.bfloat16)
    scale = (1 + 0.2 * jax.random.normal(ks[1], (k,))).astype(jnp.bfloat16)
    w = (jax.random.normal(ks[2], (k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
    return x, scale, w, jax.random.normal(ks[3], (1, 1, n), jnp.bfloat16)


def f64(a):
    return np.asarray(a, np.float64)


def rms64(x, scale, eps=1e-5):
    x = f64(x)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * f64(scale)


def kernel_weight(w, int4: bool):
    """(decode_matmul's out-major operand, W [K, N] as float64): W^T, or W packed as int4 in groups of 128
    (``awq.pack``, then ``Int4.to_out_major``: (packed [N, K/8], scale, zero [N, K/128])) and its exact levels."""
    if not int4:
        return w.T, f64(w)
    q = awq.pack(w.astype(jnp.float32), 4, 128).to_out_major()
    return (q.packed, q.scale, q.zero), f64(q.dequantize())


@pytest.mark.parametrize("int4", [False, True])
@pytest.mark.parametrize("tiles", [{}, dict(block_n=4, block_k=256, num_stages=2)])
def test_out_major_forms_equal_float64(tiles, int4):
    """W^T [N, K] (or its int4 parts) times one row: plain, with the RMSNorm, with SwiGLU after the norm, with the
    residual; float64 formulas of the same math on the same weights (int4: the dequantized levels; bf16 operands,
    one bf16 rounding of the output: errors ~2-4e-3; the plain int4 product to float32 ~1e-7)."""
    k, n, f = 512, 256, 384
    x, scale, w, r = out_major_operands(k, n)
    w, w64 = kernel_weight(w, int4)
    wgu, wgu64 = kernel_weight(out_major_operands(k, 2 * f, seed=1)[2], int4)
    run = functools.partial(DM.decode_matmul, out_major=True, interpret=True, **tiles)
    assert rel_err(run(x, w), f64(x) @ w64) < 4e-3
    assert rel_err(run(x, w, jnp.float32), f64(x) @ w64) < (1e-6 if int4 else 4e-3)  # int4: float32 throughout
    assert rel_err(run(x, w, residual=r), f64(r) + f64(x) @ w64) < 4e-3
    assert rel_err(run(x, w, norm=scale), rms64(x, scale) @ w64) < 4e-3
    gate, up = np.split(rms64(x, scale) @ wgu64, 2, axis=-1)
    glu_tiles = {**tiles, "block_n": 2 * tiles["block_n"]} if tiles else {}
    y = run(x, wgu, norm=scale, glu=True, **glu_tiles)
    assert y.shape == (1, 1, f) and rel_err(y, gate / (1 + np.exp(-gate)) * up) < 8e-3


@pytest.mark.parametrize("int4", [False, True])
def test_k_split_products_equal_float64(int4):
    """The plain and residual out-major products with K cut into 2 and 4 parts (float32 partials summed by XLA): the
    float64 formulas' numbers, and one split's within the output's rounding; splits that do not divide the K tiles,
    or with a norm or glu (which need all of K), are refused by name."""
    k, n = 1024, 256
    x, scale, w, r = out_major_operands(k, n, seed=4)
    w, w64 = kernel_weight(w, int4)
    run = functools.partial(DM.decode_matmul, out_major=True, interpret=True, block_n=4, block_k=256)
    for splits in (2, 4):
        assert rel_err(run(x, w, jnp.float32, splits=splits), f64(x) @ w64) < (1e-6 if int4 else 4e-3)
        got = run(x, w, residual=r, splits=splits)
        assert rel_err(got, f64(r) + f64(x) @ w64) < 4e-3
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(run(x, w, residual=r), np.float32),
                                   rtol=1e-2, atol=1e-2)
    for bad, message in ((dict(splits=3), "splits is 3; it must be a positive integer dividing the 4 K tiles"),
                         (dict(splits=0), "splits is 0"), (dict(splits=2, norm=scale), "splits K for the plain")):
        with pytest.raises(ValueError, match=message):
            run(x, w, **bad)


@pytest.mark.parametrize("int4", [False, True])
def test_decode_qkv_rotates_and_writes_the_cache_in_place(int4):
    """decode_qkv = RMSNorm, W_qkv (or its int4 parts), ``layers.rope`` at the position (float64 here), k and v
    written at the index of one layer of the stacked caches, every other slot as it was; an index past the cache
    clamps to its last slot, as dynamic_update_slice does."""
    heads, kv_heads, d, k_in, layers_n, max_len = 4, 2, 64, 512, 3, 16
    x, scale, w, _ = out_major_operands(k_in, (heads + 2 * kv_heads) * d, seed=2)
    wk, w64 = kernel_weight(w, int4)
    kc, vc = (jax.random.normal(jax.random.PRNGKey(s), (layers_n, 1, max_len, kv_heads, d), jnp.bfloat16)
              for s in (3, 4))
    q, kk, vv = np.split(rms64(x, scale) @ w64, [heads * d, (heads + kv_heads) * d], axis=-1)

    def rope64(t, pos):
        t = t.reshape(-1, d)
        ang = pos * (1.0 / 10000.0 ** (np.arange(0, d, 2) / d))
        t1, t2 = t[:, : d // 2], t[:, d // 2:]
        return np.concatenate([t1 * np.cos(ang) - t2 * np.sin(ang), t2 * np.cos(ang) + t1 * np.sin(ang)], -1)

    for index, slot in ((5, 5), (40, max_len - 1)):
        got_q, got_k, got_v = DM.decode_qkv(x, scale, wk, kc, vc, heads=heads, kv_heads=kv_heads, position=9,
                                            index=index, layer=1, theta=10000.0, interpret=True)
        assert got_q.shape == (1, 1, heads, d) and rel_err(got_q.reshape(heads, d), rope64(q, 9)) < 5e-3
        assert rel_err(got_k[1, 0, slot], rope64(kk, 9)) < 5e-3 and rel_err(got_v[1, 0, slot], vv.reshape(-1, d)) < 5e-3
        for got, old in ((got_k, kc), (got_v, vc)):
            np.testing.assert_array_equal(np.asarray(got.at[1, 0, slot].set(0), np.float32),
                                          np.asarray(old.at[1, 0, slot].set(0), np.float32))


def test_plans_and_refusals():
    """Out-major tiles (block_n 2, 16 with glu; block_k 512 where it divides K); the fused forms need out_major;
    tiles that are not powers of two dividing their axis are refused by name."""
    bf = jnp.bfloat16
    assert DM.plan(1, 5632, 2048, bf, out_major=True) == dict(block_n=2, block_k=512, num_warps=4, num_stages=3)
    assert DM.plan(1, 2048, 11264, bf, out_major=True, glu=True) == dict(block_n=16, block_k=256, num_warps=4,
                                                                           num_stages=3)
    assert DM.plan(1, 768, 2048, bf, out_major=True)["block_k"] == 256
    assert DM.qkv_plan(2048, 16, 16, 128, bf) == dict(block_n=8, block_k=512, num_warps=4, num_stages=2)
    assert DM.plan(1, 2048, 2048, jnp.float32, out_major=True) is None and DM.qkv_plan(2048, 16, 16, 12, bf) is None
    x, scale, w, r = out_major_operands(512, 256)
    with pytest.raises(ValueError, match="out-major product only"):
        DM.decode_matmul(x, w, residual=r, interpret=True)
    for tiles, name in ((dict(block_n=3), "block_n"), (dict(block_k=1024), "block_k"), (dict(block_n=512), "block_n"),
                        (dict(block_n=True), "block_n"), (dict(block_k=256.0), "block_k")):
        with pytest.raises(ValueError, match=f"decode_matmul's {name} is"):
            DM.decode_matmul(x, w.T, out_major=True, interpret=True, **tiles)
    with pytest.raises(ValueError, match="block_n with glu counts both halves"):
        DM.decode_matmul(x, w.T, out_major=True, glu=True, interpret=True, block_n=1)
    kc = jnp.zeros((1, 1, 8, 2, 64), bf)
    x, scale, wqkv = x[..., :256], scale[:256], jnp.zeros((8 * 64, 256), bf)  # W_qkv^T [N, K]
    with pytest.raises(ValueError, match="decode_qkv's block_n is 6"):
        DM.decode_qkv(x, scale, wqkv, kc, kc, heads=4, kv_heads=2, position=0, index=0, layer=0, theta=1e4,
                      interpret=True, block_n=6)
    with pytest.raises(ValueError, match="decode_qkv takes one bf16/fp16 row"):  # W_qkv, not its transpose
        DM.decode_qkv(x, scale, wqkv.T, kc, kc, heads=4, kv_heads=2, position=0, index=0, layer=0, theta=1e4)


def test_int4_plans_and_refusals():
    """int4 tiles at the 1.26B config's shapes (block_k the largest power of two up to 1024 dividing K; a K split per
    tile, block_n 8 and a warp per 2048 inputs of the tile for the plain products; block_n 16 with glu and for
    W_qkv); groups that are not powers of two >= 16 dividing K, K tiles that are not whole groups, in-major int4, and
    parts that are not uint32 words with scales and zeros of their shape are refused."""
    bf = jnp.bfloat16
    plan = functools.partial(DM.plan, 1, dtype=bf, out_major=True, group=128)
    assert plan(2048, 2048) == dict(block_n=8, block_k=1024, splits=2, num_warps=4, num_stages=3)
    assert plan(5632, 2048) == dict(block_n=8, block_k=512, splits=11, num_warps=2, num_stages=3)
    assert plan(256, 4 * 131) == dict(block_n=2, block_k=256, splits=1, num_warps=1, num_stages=3)
    assert plan(2048, 11264, glu=True) == dict(block_n=16, block_k=1024, num_warps=4, num_stages=3)
    assert DM.qkv_plan(2048, 16, 16, 128, bf, 128) == dict(block_n=16, block_k=1024, num_warps=4, num_stages=3)
    assert DM.qkv_plan(2048, 16, 16, 8, bf, 128)["block_n"] == 8
    assert None not in (plan(256, 256), DM.plan(1, 512, 256, bf, out_major=True, group=512))
    for group in (96, 8, 1024):  # not a power of two, too small, more than K
        assert plan(512, 256, group=group) is None and DM.qkv_plan(512, 4, 2, 64, bf, group) is None
    assert DM.plan(1, 512, 256, bf, group=128) is None  # int4 kernels are out-major only
    x, _, w, _ = out_major_operands(512, 256)
    w4, _ = kernel_weight(w, True)
    with pytest.raises(ValueError, match="multiple of their group"):
        DM.decode_matmul(x, w4, out_major=True, interpret=True, block_k=64)
    with pytest.raises(ValueError, match="int4 weights, in the out-major product only"):
        DM.decode_matmul(x, w4, interpret=True)
    packed, sc, zero = w4
    for bad in ((packed.astype(jnp.int32), sc, zero), (packed, sc[:, :2], zero), (packed, sc, zero[:-1])):
        assert not DM.takes(x, bad, out_major=True)
        with pytest.raises(ValueError, match="int4 parts"):
            DM.decode_matmul(x, bad, out_major=True, interpret=True)
    kc = jnp.zeros((1, 1, 8, 2, 64), bf)
    with pytest.raises(ValueError, match="or its int4 parts"):
        DM.decode_qkv(x[..., :256], x[0, 0, :256], w4, kc, kc, heads=4, kv_heads=2, position=0, index=0, layer=0,
                      theta=1e4)


def test_int4_out_major_weight_is_the_same_weight():
    """awq.Int4.to_out_major transposes the words, scales and zeros: the same dequantized weight and the same products
    through ``layers.linear`` (plain and transposed; the experts form refused); columns no longer join; uint8 bytes
    and an out-major weight are refused."""
    _, _, w, _ = out_major_operands(256, 128)
    w4 = awq.pack(w.astype(jnp.float32), 4, 128)
    t = w4.to_out_major()
    assert t.out_major and not t.out_last and w4.out_last and t.packed.shape == (128, 256 // 8)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), np.asarray(w4.dequantize()))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 256), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(layers.linear(t, x), np.float32),
                                  np.asarray(layers.linear(w4, x), np.float32))
    np.testing.assert_array_equal(np.asarray(layers.linear(t, x[:, :128], transpose=True), np.float32),
                                  np.asarray(layers.linear(w4, x[:, :128], transpose=True), np.float32))
    with pytest.raises(ValueError, match="dense form only"):
        layers.linear(t, x, experts=True)
    assert weights.join_out([t, t]) is None
    for bad in (t, w4.replace(packed=w4.packed.astype(jnp.uint8))):
        with pytest.raises(ValueError, match="to_out_major takes one in-major matrix of uint32 words"):
            bad.to_out_major()


def test_out_major_weight_is_the_same_product():
    """weights.OutMajor(W^T) through ``layers.linear`` gives x @ W (plain and transposed requests); the experts form
    is refused."""
    x, _, w, _ = out_major_operands(256, 128)
    wt = weights.OutMajor(w.T)
    np.testing.assert_array_equal(np.asarray(layers.linear(wt, x), np.float32),
                                  np.asarray(layers.linear(w, x), np.float32))
    np.testing.assert_array_equal(np.asarray(layers.linear(wt, x[..., :128], transpose=True), np.float32),
                                  np.asarray(layers.linear(w, x[..., :128], transpose=True), np.float32))
    with pytest.raises(ValueError, match="dense form only"):
        layers.linear(wt, x, experts=True)


@pytest.fixture(scope="module")
def tiny_transformer():
    from tests import helpers

    cfg = helpers.tiny("transformer", d_model=256, vocab_size=64, dtype="bfloat16", d_ff=512, n_heads=4, n_kv_heads=2)
    return cfg, helpers.random_params(cfg)


def test_fused_decode_layer_equals_the_op_by_op_step(tiny_transformer):
    """model.decode="pallas" (interpreted): decode_params lays the four projections out-major (``weights.OutMajor``),
    each batch-1 cached step runs decode_qkv and three out-major products a layer, and its logits and cache equal the
    op-by-op step's ("xla") within bf16 roundings; greedy decoding follows XLA's argmax. A batch of 2 with the
    out-major layout takes XLA's products (the layer's kernels are for one row) and equals the plain layout's step."""
    import models
    from models import generate as G

    model = models.get("transformer")
    base, params = tiny_transformer
    xla, fused = (dataclasses.replace(base, decode=d) for d in ("xla", "pallas"))
    p_xla, p_fused = model.decode_params(params, xla, batch=1), model.decode_params(params, fused, batch=1)
    assert not isinstance(p_xla["layers"][0]["wo"], weights.OutMajor)
    for batch in (None, 2):  # the layer's kernels take one row: other batches keep the [in, out] layout
        assert not isinstance(model.decode_params(params, fused, batch=batch)["layers"][0]["wo"], weights.OutMajor)
    f32 = dataclasses.replace(fused, dtype="float32")  # nor does a config the kernels do not take
    assert not isinstance(model.decode_params(params, f32, batch=1)["layers"][0]["wo"], weights.OutMajor)
    assert all(isinstance(p_fused["layers"][0][n], weights.OutMajor) for n in ("wqkv", "wo", "w_gate_up", "w_down"))
    assert p_fused["layers"][0]["wqkv"].t.shape == (8 * 64, 256)

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def steps(cfg, dp, batch):
        cache, out = model.init_cache(cfg, batch, 16), []
        for t in (7, 11):
            logits, aux = model.apply(dp, jnp.full((batch, 1), t), cfg, cache=cache)
            cache = aux["cache"]
            out.append(logits)
        return jnp.stack(out), cache

    jaxpr = str(jax.make_jaxpr(lambda dp: steps(fused, dp, 1))(p_fused))
    assert jaxpr.count("name=decode_qkv_") == 2 * base.n_layers
    assert jaxpr.count("name=decode_matmul_") == 2 * 3 * base.n_layers
    for batch in (1, 2):
        (want, want_cache), (got, got_cache) = steps(xla, p_xla, batch), steps(fused, p_fused, batch)
        assert rel_err(got, want) < (1.5e-2 if batch == 1 else 1e-6)  # bf16 roundings in other places: ~8e-3
        for name in ("k", "v"):
            assert rel_err(got_cache[name], want_cache[name]) < (1e-2 if batch == 1 else 1e-6)  # ~5e-3
    prompt = (5, 17, 3, 9)
    assert_near_argmax(model, params, xla, prompt, G.greedy(model, params, fused, (prompt,), max_new_tokens=5)[0])


def test_int4_fused_layer_equals_the_op_by_op_step(tiny_transformer, monkeypatch):
    """RTN int4 weights (group 128) with model.decode="pallas": decode_params lays the four projections out-major
    (``awq.Int4.to_out_major``) for one row only, each cached step runs the six-kernel layer on them, and its logits
    and cache equal the op-by-op step's on the same int4 weights within bf16 roundings (measured ~7e-3 and ~5e-3),
    also with W_o and W_down cut into K splits.
    A layer whose projections are not all int4 matrices of one group keeps the op-by-op step."""
    import models

    model = models.get("transformer")
    base, params = tiny_transformer
    q = awq.quantize(params, model.param_axes(base), base, bits=4, group=128, method="rtn")[0]
    xla, fused = (dataclasses.replace(base, decode=d) for d in ("xla", "pallas"))
    p_xla, p_fused = model.decode_params(q, xla, batch=1), model.decode_params(q, fused, batch=1)
    names = ("wqkv", "wo", "w_gate_up", "w_down")
    assert all(not p_xla["layers"][0][n].out_major and p_fused["layers"][0][n].out_major for n in names)
    assert not model.decode_params(q, fused, batch=2)["layers"][0]["wo"].out_major
    mixed = {**q, "layers": {**q["layers"], "wo": params["layers"]["wo"]}}  # W_o plain, the others int4
    assert not model.decode_params(mixed, fused, batch=1)["layers"][0]["wqkv"].out_major

    @functools.partial(jax.jit, static_argnums=0)
    def steps(cfg, dp):
        cache, out = model.init_cache(cfg, 1, 16), []
        for t in (7, 11, 3):
            logits, aux = model.apply(dp, jnp.full((1, 1), t), cfg, cache=cache)
            cache = aux["cache"]
            out.append(logits)
        return jnp.stack(out), cache

    jaxpr = str(jax.make_jaxpr(lambda dp: steps(fused, dp))(p_fused))
    assert jaxpr.count("name=decode_qkv_int4g128") == 3 * base.n_layers
    assert len(re.findall(r"name=decode_matmul_\w*_int4g128_", jaxpr)) == 3 * 3 * base.n_layers
    (want, want_cache), (got, got_cache) = steps(xla, p_xla), steps(fused, p_fused)
    assert rel_err(got, want) < 1.5e-2
    for name in ("k", "v"):
        assert rel_err(got_cache[name], want_cache[name]) < 1e-2
    # W_o and W_down with K cut into one-group splits (the tiny shapes take one program over K; the 1.26B's split)
    plan = DM.plan

    def split_plan(m, k, n, dtype, **kw):
        p = plan(m, k, n, dtype, **kw)
        return p if p is None or kw.get("glu") else dict(p, block_k=128, splits=k // 128)

    monkeypatch.setattr(DM, "plan", split_plan)
    jax.clear_caches()
    split, _ = steps(fused, p_fused)
    assert rel_err(split, want) < 1.5e-2 and rel_err(split, got) < 1e-2
    jax.clear_caches()


def test_fused_kernels_lower_for_cuda_without_a_gpu():
    """The 1.26B config's six-kernel layer: decode_qkv and the three out-major products lower to one Triton call each
    for an H200, on bf16 and on int4 weights."""
    sd, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    out_major = functools.partial(DM.decode_matmul, out_major=True, interpret=False)
    cases = [(lambda x, w, r: out_major(x, w, residual=r), sd((1, 1, 2048), bf), sd((2048, 2048), bf),
              sd((1, 1, 2048), bf)),
             (lambda x, w, r: out_major(x, w, residual=r), sd((1, 1, 5632), bf), sd((2048, 5632), bf),
              sd((1, 1, 2048), bf)),
             (lambda x, w, s: out_major(x, w, norm=s, glu=True), sd((1, 1, 2048), bf), sd((11264, 2048), bf),
              sd((2048,), bf)),
             (lambda x, s, w, kc, i: DM.decode_qkv(x, s, w, kc, kc, heads=16, kv_heads=16, position=i, index=i,
                                                   layer=3, theta=1e4, interpret=False),
              sd((1, 1, 2048), bf), sd((2048,), bf), sd((6144, 2048), bf), sd((22, 1, 768, 16, 128), bf),
              sd((), jnp.int32))]
    int4 = [(fn, *(int4_parts(a.shape) if a.ndim == 2 and a.shape[0] > 1 else a for a in args)) for fn, *args in cases]
    for fn, *args in cases + int4:
        with h200():
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1


def int4_parts(shape, group=128):
    """Abstract out-major int4 parts of a weight W^T [N, K]: packed uint32 [N, K/8], float16 scale, zero."""
    n, k = shape
    sd = jax.ShapeDtypeStruct
    return sd((n, k // 8), jnp.uint32), sd((n, k // group), jnp.float16), sd((n, k // group), jnp.float16)


def test_switch_model_fuses_its_dense_layers_only():
    """A Switch model with model.decode="pallas": the dense layer runs the six-kernel layer, the MoE layer its own
    dropless path (its experts are not joined); the cached steps' logits equal the op-by-op step's within bf16."""
    import models
    from tests import helpers

    model = models.get("transformer")
    cfg = helpers.tiny("switch", d_model=256, d_ff=512, n_heads=4, n_kv_heads=2, vocab_size=64, dtype="bfloat16",
                       decode="pallas")
    params = helpers.random_params(cfg)
    dense, moe_layer = model.decode_params(params, cfg, batch=1)["layers"]
    assert isinstance(dense["wo"], weights.OutMajor) and not isinstance(moe_layer["wo"], weights.OutMajor)

    @functools.partial(jax.jit, static_argnums=0)
    def steps(cfg):
        dp, cache, out = model.decode_params(params, cfg, batch=1), model.init_cache(cfg, 1, 16), []
        for t in (7, 11):
            logits, aux = model.apply(dp, jnp.array([[t]]), cfg, cache=cache)
            cache, out = aux["cache"], out + [logits]
        return jnp.stack(out)

    assert str(jax.make_jaxpr(lambda: steps(cfg))()).count("name=decode_qkv_") == 2  # one dense layer, two steps
    assert rel_err(steps(cfg), steps(dataclasses.replace(cfg, decode="xla"))) < 1.5e-2  # ~6e-3
