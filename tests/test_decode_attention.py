"""The fused decode-attention kernel (Pallas, interpreted on CPU) against ``attention.reference``: MHA and GQA,
batch 1 and more, q_start at 0, mid-cache and at the last slot, empty and packed slots, split-K on and off,
tiles that do not divide the cache, tiles past the last query never read; its dispatch (``pallas_decode``), also under a mesh;
greedy decoding of a tiny Transformer through it equal to XLA's; the Triton lowering for an H200."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import attention as A
from models import decode_attention as DA
from models import generate as G
from parallel import mesh as pmesh
from parallel import sharding
from parallel.sharding import DEFAULT_RULES
from tests import helpers
from tests.helpers import h200, jit, rel_err

pytestmark = pytest.mark.timeout(120)

LAYERS, LAYER = 3, 1
# (batch, q_len, heads, kv_heads, head_dim, max_len, q_start, block_k, splits, segments)
CASES = {
    "mha_b1_start0_ragged_auto_split": (1, 1, 4, 4, 16, 40, 0, 16, 0, True),
    "gqa_b3_mid_no_split": (3, 1, 8, 2, 16, 40, 21, 16, 1, True),
    "gqa_b3_mid_split4": (3, 1, 8, 2, 16, 40, 21, 16, 4, True),
    "gqa_b2_last_slot_split2": (2, 1, 4, 2, 16, 40, 39, 16, 2, True),
    "gqa_3_tokens_padded_rows_no_segments": (2, 3, 8, 2, 8, 48, 17, 16, 2, False),
}


def make_case(b, sq, h, kvh, d, t, q_start, tk, seed=0):
    """q, the stacked cache (NaN in every tile past the one holding the last query: never to be read), segment
    ids: row 0 left-padded (segment 0 before slot 3), the last row of two packed segments (the queries in
    the second), slots after the queries empty; and the same cache with the NaNs as zeros."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = f(b, sq, h, d), f(LAYERS, b, t, kvh, d), f(LAYERS, b, t, kvh, d)
    last = q_start + sq - 1
    kv_seg = np.ones((b, t), np.int32)
    kv_seg[:, last + 1:] = 0
    kv_seg[0, :min(3, q_start)] = 0
    if b > 1:
        kv_seg[-1, :q_start // 2] = 2
    q_seg = np.ones((b, sq), np.int32)
    end = -(-(last + 1) // tk) * tk
    clean_k, clean_v = k.copy(), v.copy()
    clean_k[:, :, last + 1:] = clean_v[:, :, last + 1:] = 0.0
    k[:, :, last + 1:] = clean_k[:, :, last + 1:]
    v[:, :, last + 1:] = clean_v[:, :, last + 1:]
    k[:, :, end:] = v[:, :, end:] = np.nan
    return q, k, v, clean_k, clean_v, q_seg, kv_seg


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_reference(name):
    b, sq, h, kvh, d, t, q_start, tk, splits, seg = CASES[name]
    q, k, v, ck, cv, q_seg, kv_seg = make_case(b, sq, h, kvh, d, t, q_start, tk)
    segs = (q_seg, kv_seg) if seg else (None, None)
    config = DA.Config(block_k=tk, splits=splits)
    got = jit(lambda q, k, v, start, qs, ks: DA.decode_attention(q, k, v, start, qs, ks, layer=LAYER, config=config,
                                                                 interpret=True))(q, k, v, q_start, *segs)
    want = A.reference(q, ck[LAYER], cv[LAYER], q_segment_ids=segs[0], kv_segment_ids=segs[1], q_start=q_start)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert rel_err(got, want) < 1e-5, name
    if name == "gqa_b2_last_slot_split2":  # the same through the dispatch, under a mesh (rows and heads split)
        with sharding.activate(pmesh.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4]), DEFAULT_RULES):
            got = jit(lambda *a: A.attention(*a[:3], implementation="pallas_decode", q_segment_ids=a[3],
                                             kv_segment_ids=a[4], q_start=a[5], kv_layer=LAYER))(q, ck, cv, *segs,
                                                                                                q_start)
        assert rel_err(got, want) < 1e-5
    if name == "gqa_b3_mid_no_split":
        assert DA.auto_splits(1, 16, 768) == 8 and DA.auto_splits(64, 16, 768) == 1 and DA.auto_splits(1, 4, 40, DA.Config(block_k=16)) == 2


def test_dispatch_and_refusals():
    q, k = jnp.zeros((1, 1, 4, 16)), jnp.zeros((2, 1, 200, 2, 16))
    seg = jnp.ones((1, 1), jnp.int32), jnp.ones((1, 200), jnp.int32)

    def calls(implementation, q, k, **kw):
        jaxpr = jax.make_jaxpr(lambda q, k: A.attention(q, k, k, implementation=implementation, q_segment_ids=seg[0],
                                                        kv_segment_ids=seg[1], **kw))(q, k)
        return str(jaxpr).count("pallas_call")

    assert calls("pallas_decode", q, k, q_start=5, kv_layer=1) == 2  # split-K: kernel and combine
    assert calls("auto", q, k, q_start=5, kv_layer=1) == 0  # ``auto`` takes the kernel on GPU only
    square = jnp.zeros((1, 200, 4, 16))  # training / prefill over the whole key axis: the ``auto`` path
    assert calls("pallas_decode", square, k[0]) == 0
    assert A.is_decode_step(q, k) and not A.is_decode_step(square, k)
    assert DA.supports(128) and not DA.supports(8) and not DA.supports(96)
    with pytest.raises(ValueError, match="block_k is 24"):
        DA.decode_attention(q, k[0], k[0], 0, config=DA.Config(block_k=24), interpret=True)
    with pytest.raises(ValueError, match="head_dim is 8"):
        DA.decode_attention(q[..., :8], k[0, ..., :8], k[0, ..., :8], 0, interpret=False)
    with pytest.raises(ValueError, match="both be given"):
        DA.decode_attention(q, k[0], k[0], 0, seg[0], interpret=True)
    with pytest.raises(ValueError, match="not a multiple of kv_heads"):
        DA.decode_attention(jnp.zeros((1, 1, 3, 16)), k[0], k[0], 0, interpret=True)


def test_greedy_decoding_equals_xla():
    """Greedy generation (an 8-token prefill into a 16-slot cache and one-token steps: the kernel takes both,
    q_len <= 16 against a longer cache) through pallas_decode gives XLA's tokens; the cached step of
    ``apply`` reaches the kernel with the stacked cache (kernel and combine in the program, no slice)."""
    T = models.get("transformer")
    xla, pallas = (helpers.tiny(attention=a) for a in ("xla", "pallas_decode"))
    params = helpers.random_params(xla)
    prompts = ((5, 17), (8, 1, 33, 60), (12, 7, 7, 30, 44, 9, 51))
    want = G.greedy(T, params, xla, prompts, max_new_tokens=5)
    assert G.greedy(T, params, pallas, prompts, max_new_tokens=5) == want
    cache = T.init_cache(pallas, 2, 256)
    jaxpr = str(jax.make_jaxpr(lambda p, t, c: T.apply(p, t, pallas, cache=c))(
        T.decode_params(params, pallas), jnp.zeros((2, 1), jnp.int32), cache))
    assert jaxpr.count("pallas_call") == 2 * pallas.n_layers and "dynamic_slice" not in jaxpr


def test_triton_lowering_for_cuda_without_a_gpu():
    """The 1.26B shapes lower to Triton calls for an H200: batch 1 split-K (kernel + combine), batch 64 one kernel;
    GQA with 3 tokens and a cache length no tile divides."""
    sd = jax.ShapeDtypeStruct
    bf, i32 = jnp.bfloat16, jnp.int32
    for b, sq, h, kvh, d, t, calls in ((1, 1, 16, 16, 128, 768, 2), (64, 1, 16, 16, 128, 768, 1),
                                       (2, 3, 8, 2, 64, 100, 2)):
        args = (sd((b, sq, h, d), bf), sd((22, b, t, kvh, d), bf), sd((22, b, t, kvh, d), bf), sd((), i32),
                sd((b, sq), i32), sd((b, t), i32))
        with h200():
            text = jax.jit(lambda q, k, v, start, qs, ks: DA.decode_attention(
                q, k, v, start, qs, ks, layer=5, interpret=False)).trace(*args).lower(
                lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == calls, (b, sq, t)


def test_auto_takes_the_kernel_on_gpu_only_where_the_layout_allows(monkeypatch):
    """``auto`` on a GPU (traced, not run) sends a cached step to the kernel under a layout it can run in, and to
    XLA where heads and kv_heads lie on different mesh axes or the rows do not divide over their devices."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    mesh = pmesh.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    apart = tuple((name, None if name == "kv_heads" else target) for name, target in DEFAULT_RULES)

    def kernels(rules, b):
        q, k = jnp.zeros((b, 1, 4, 16), jnp.bfloat16), jnp.zeros((2, b, 256, 2, 16), jnp.bfloat16)
        with sharding.activate(mesh, rules):
            fn = lambda q, k: A.attention(q, k, k, implementation="auto", q_start=5, kv_layer=1)  # noqa: E731
            return str(jax.make_jaxpr(fn)(q, k)).count("pallas_call"), DA.layout_problem(b, 4, 2) is None

    assert kernels(DEFAULT_RULES, 2) == (2, True)  # split-K: the kernel and its combine
    assert kernels(apart, 2) == (0, False) and kernels(DEFAULT_RULES, 1) == (0, False)
    # Asked for by name, the kernel refuses such a layout in one sentence.
    for rules, b, match in ((apart, 2, "needs both on the same mesh axes"), (DEFAULT_RULES, 1, "do not divide")):
        q, k = jnp.zeros((b, 1, 4, 16), jnp.bfloat16), jnp.zeros((2, b, 256, 2, 16), jnp.bfloat16)
        with sharding.activate(mesh, rules), pytest.raises(ValueError, match=match):
            DA.decode_attention(q, k, k, 5, layer=1)
