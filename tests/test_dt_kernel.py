"""Mamba's dt kernel (``models/dt_kernel.py``, interpreted on CPU) against a float64 softplus and XLA's
gradient, and in training through the model with the Pallas scan, on one device and under a mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import dt_kernel as DK
from models import mamba as M
from tests.helpers import jit, rel_err
from tests.test_mamba import RULES  # channels (inner) over the tensor axis

pytestmark = pytest.mark.timeout(120)


def xla_dt(dbc, w, bias, nonpad):
    """The model's XLA dt in float32: softplus(dt_low w + bias), 0 at padding."""
    v = dbc[..., :w.shape[0]] @ w + bias
    return jnp.where(nonpad[..., None], jax.nn.softplus(v), 0.0)


def test_dt_equals_float64_and_its_gradient_equals_xla():
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    R, E = 16, 48
    dbc, w, bias = f(3, 32, R + 16), f(R, E) / 4, f(E) * 4  # softplus from its series to its linear end
    nonpad = jnp.asarray(rng.random((3, 32)) > 0.2)
    got = DK.dt(dbc, w, bias, nonpad, interpret=True)
    v = np.asarray(dbc[..., :R], np.float64) @ np.asarray(w, np.float64) + np.asarray(bias, np.float64)
    np.testing.assert_allclose(got, np.logaddexp(v, 0) * np.asarray(nonpad)[..., None], rtol=1e-5, atol=1e-7)
    g = f(3, 32, E)
    loss = lambda fn: lambda d, w, b: jnp.sum(fn(d, w, b) * g)  # noqa: E731
    want = jax.grad(loss(lambda d, w, b: xla_dt(d, w, b, nonpad)), argnums=(0, 1, 2))(dbc, w, bias)
    grads = jax.grad(loss(lambda d, w, b: DK.dt(d, w, b, nonpad, interpret=True)), argnums=(0, 1, 2))(dbc, w, bias)
    for name, a, b in zip(("dbc", "w", "bias"), grads, want):
        assert rel_err(a, b) < 1e-5, name
    assert not np.any(np.asarray(grads[0][..., R:]))  # B and C's columns get nothing from dt
    for bad in ((32, 8, E), (40, R, E), (32, R, 40)):  # R not a power of 2 >= 16; seq, channels not multiples of 16
        assert not DK.takes(*bad)
    with pytest.raises(ValueError, match="power of 2"):
        DK.dt(dbc[..., :8 + 16], w[:8], bias)


CFG = M.Config(vocab_size=61, d_model=32, n_layers=2, d_state=8, dt_rank=16, dtype="float32", chunk_size=8,
               scan="pallas")


def _grad(cfg, params, tokens, seg):
    def loss(p):
        logits = M.apply(p, tokens, cfg, segment_ids=seg)[0]
        return jnp.mean(logits ** 2), logits
    return jax.grad(loss, has_aux=True)(params)


def test_training_through_the_kernel_equals_xla_on_one_device_and_under_a_mesh():
    """The Pallas-scan Mamba's gradients with dt through the kernel (forward and gradient kernels in the layer
    scan's body) equal the chunked scan's with XLA's dt; under a {data 2, tensor 2} mesh (the kernels per
    device) as well."""
    from parallel import mesh as pmesh, sharding

    params = jit(M.init, static_argnums=0)(CFG, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 61, (4, 16)), jnp.int32)
    seg = jnp.asarray([[1] * 16, [1] * 6 + [2] * 10, [0] * 3 + [1] * 13, [1] * 12 + [0] * 4], jnp.int32)
    grad = jit(_grad, static_argnums=0)
    jaxpr = str(jax.make_jaxpr(lambda p: _grad(CFG, p, tokens, seg))(params))
    assert jaxpr.count("name=mamba_dt_grad") >= 1 and jaxpr.count("name=mamba_dt") > jaxpr.count("name=mamba_dt_grad")
    g_ref, logits_ref = grad(dataclasses.replace(CFG, scan="chunked"), params, tokens, seg)
    g, logits = grad(CFG, params, tokens, seg)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-5
    # the same jitted function, traced again: the mesh is in jit's cache key
    with sharding.activate(pmesh.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4]), RULES):
        jaxpr = str(jax.make_jaxpr(lambda p: _grad(CFG, p, tokens, seg))(params))
        assert "shard_map" in jaxpr and "name=mamba_dt_grad" in jaxpr
        g_mesh, logits_mesh = grad(CFG, params, tokens, seg)
    np.testing.assert_allclose(logits_mesh, logits_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_mesh), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-5


def test_channels_too_few_per_device_take_xla():
    """E = 32 split over tensor 4 leaves 8 channels a device, below a tensor-core tile: XLA's dt, not the kernel."""
    from parallel import mesh as pmesh, sharding

    cfg = dataclasses.replace(CFG, d_model=16)
    params = jit(M.init, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    tokens = jnp.ones((2, 16), jnp.int32)
    apply = lambda p: M.apply(p, tokens, cfg)[0]  # noqa: E731
    with sharding.activate(pmesh.make_mesh({"data": 2, "tensor": 4}, jax.devices()[:8]), RULES):
        assert "name=mamba_dt" not in str(jax.make_jaxpr(apply)(params))
    assert "name=mamba_dt" in str(jax.make_jaxpr(apply)(params))  # one device: all 32 channels

