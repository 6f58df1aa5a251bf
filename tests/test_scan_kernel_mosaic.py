"""Mosaic GPU prototype of the selective-scan forward (models/scan_kernel_mosaic.py), jax >= 0.11 only: the CPU
interpreter against a float64 NumPy loop, and the lowering for an H200 without a GPU (one Mosaic GPU call; the
Triton kernel's lowering, by contrast, warns that the Pallas Triton backend is deprecated)."""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import scan_kernel as K
from models import scan_kernel_mosaic as KM
from tests.helpers import h200, rel_err

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not KM.AVAILABLE, reason=f"the Mosaic GPU scan needs jax >= 0.11 ({jax.__version__})")]


def numpy_scan(x, dt, A, B, C, h0):
    """float64 loop: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = h_t C_t."""
    x, dt, A, B, C, h = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, h0))
    y = np.zeros(x.shape)
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        y[:, t] = np.einsum("ben,bn->be", h, C[:, t])
    return y, h


def test_interpreted_forward_matches_float64_numpy():
    """Two rows x two 64-channel blocks, N 16, 4 chunks of 4 steps, bf16 x/B/C read as is, nonzero h0."""
    b, s, E, N = 2, 16, 128, 16
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    x, B, C = (jnp.asarray(f(*sh), jnp.bfloat16) for sh in ((b, s, E), (b, s, N), (b, s, N)))
    dt = jnp.asarray(np.log1p(np.exp(f(b, s, E) - 2.0)))
    A, h0 = jnp.asarray(-np.exp(0.5 * f(E, N)) - 0.1), jnp.asarray(f(b, E, N))
    y, h = KM.selective_scan_mosaic(x, dt, A, B, C, h0=h0, chunk=4, interpret=True)
    y_ref, h_ref = numpy_scan(x, dt, A, B, C, h0)
    assert y.shape == (b, s, E) and h.shape == (b, E, N) and y.dtype == h.dtype == jnp.float32
    assert rel_err(y, y_ref) < 1e-6 and rel_err(h, h_ref) < 1e-6
    with pytest.raises(ValueError, match="E % 64 == 0"):
        KM.selective_scan_mosaic(x[..., :96], dt[..., :96], A[:96], B, C, interpret=True)


def test_lowers_to_mosaic_gpu_for_cuda_without_a_gpu():
    """Layout inference and the Mosaic GPU dialect lowering run at jax lowering time (PTX is made later, on a
    GPU), so this catches unsupported ops and layouts; the Triton kernel lowers too, with the deprecation."""
    b, s, E, N = 2, 64, 128, 16
    sd = jax.ShapeDtypeStruct
    args = (sd((b, s, E), jnp.bfloat16), sd((b, s, E), jnp.float32), sd((E, N), jnp.float32),
            sd((b, s, N), jnp.bfloat16), sd((b, s, N), jnp.bfloat16))
    mosaic = functools.partial(KM.selective_scan_mosaic, interpret=False)
    triton = functools.partial(K.selective_scan_pallas, interpret=False, seq_splits=1)
    with h200():
        for fn, call, deprecated in ((mosaic, "@mosaic_gpu_v2", False), (triton, "__gpu$xla.gpu.triton", True)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count(call) == 1
            msgs = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
            assert any("Pallas Triton backend is deprecated" in m for m in msgs) == deprecated, msgs
