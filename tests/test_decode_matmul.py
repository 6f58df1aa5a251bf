"""The batch-1 decoding matmul kernel (Pallas, interpreted on CPU) against a float64 product: bf16 and fp16,
float32 output; the shapes it refuses; ``layers.linear``'s dispatch to it on a GPU (traced) and not under a mesh,
and its gradient there; greedy decoding through it; the Triton lowering for an H200."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decode_matmul as DM
from models import layers
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
    monkeypatch.setattr(layers, "_decode_kernels", lambda: True)
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
def test_greedy_decoding_through_the_kernel_equals_xla(family, monkeypatch):
    """A tiny bf16 model's batch-1 greedy decoding with every projection through the kernel (the plan's width
    floor lowered to the tiny sizes; interpreted) gives XLA's tokens; a cached step's logits agree within bf16."""
    import models
    from models import generate as G
    from tests import helpers

    model = models.get(family)
    extra = dict(d_ff=512, n_heads=4, n_kv_heads=4) if family == "transformer" else {}
    cfg = helpers.tiny(family, d_model=256, vocab_size=64, dtype="bfloat16", **extra)
    params = helpers.random_params(cfg)
    prompts = ((5, 17, 3, 9),)
    want = G.greedy(model, params, cfg, prompts, max_new_tokens=4)
    step = (lambda p, t, c: model.apply(p, t, cfg, cache=c)[0])
    dp, tok, cache = model.decode_params(params, cfg), jnp.array([[7]]), model.init_cache(cfg, 1, 16)
    ref = step(dp, tok, cache)
    monkeypatch.setattr(DM, "MIN_N", 0)
    monkeypatch.setattr(layers, "_decode_kernels", lambda: True)
    jax.clear_caches()
    kernels = str(jax.make_jaxpr(step)(dp, tok, cache)).count("name=decode_matmul_")
    # per layer W_qkv, W_o, W_gate_up, W_down; or in_xz, out_proj; and an untied LM head (a tied one multiplies by
    # the embedding's transpose: XLA)
    assert kernels == (4 if family == "transformer" else 2) * cfg.n_layers + (not cfg.tie_embeddings)
    assert rel_err(step(dp, tok, cache), ref) < 1e-2
    assert G.greedy(model, params, cfg, prompts, max_new_tokens=4) == want
    jax.clear_caches()
