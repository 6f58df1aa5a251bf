"""Pallas blockwise attention (models/flash_kernel.py), interpreted on CPU.

Forward (o, lse) and backward (dq, dk, dv from a given global lse and delta) equal the XLA blockwise
kernel (models/block_attention.py) in float32 for causal and non-causal masks, MHA and GQA, with and
without segment ids, with positions as a ring step gives them (keys entirely earlier, partly
masked, later; rows that see no key), query and key blocks of different lengths, a padded head
dimension and uneven tiles; the forward also equals a float64 NumPy formula. The fused backward
(dq by atomic adds in the dk, dv kernel) equals the XLA kernel in every case too. Ring attention with
kernel='pallas' on a 4-device zigzag ring equals dense attention; both kernels lower to Triton
calls for an H200 without a GPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from models import attention as A
from models import block_attention as blk
from models import flash_kernel as fk
from parallel import ring_attention as R
from tests.helpers import h200, jit, rel_err

pytestmark = pytest.mark.timeout(120)

TOL = 1e-5
SMALL = fk.Config(block_q=16, block_k=16, dkdv_block_k=16, dkdv_block_q=16, dq_block_q=16, dq_block_k=16)
UNEVEN = fk.Config(block_q=32, block_k=16, dkdv_block_k=16, dkdv_block_q=32, dq_block_q=32, dq_block_k=16,
                   group=2)  # programs tile-major over pairs of (batch row, head)

# name: (causal, kv_heads, segments, sq, sk, head_dim, q_idx offset, k_idx offset, config, lse from noise)
CASES = {
    # query tile 0 holds positions 24..39: key tiles 0-15 whole, 16-31 and 32-47 partly, 48-63 hidden.
    "causal-gqa-keys-earlier": (True, 2, False, 64, 64, 32, 24, 0, SMALL, True),
    # keys shifted 8 later: the first 8 query rows see nothing (lse = -inf, o = 0); the global lse is the local one.
    "causal-mha-seg-keys-later": (True, 4, True, 64, 64, 24, 0, 8, UNEVEN, False),
    # a zigzag 'later' step: half the queries against all keys.
    "noncausal-gqa-seg-half-queries": (False, 2, True, 32, 64, 16, 0, 0, SMALL, True),
}


def make(case, seed=0):
    causal, kvh, segs, sq, sk, d, q_off, k_off, config, noise = CASES[case]
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    b, h = 2, 4
    q, k, v, do = f(b, sq, h, d), f(b, sk, kvh, d), f(b, sk, kvh, d), f(b, sq, h, d)
    q_idx, k_idx = q_off + jnp.arange(sq), k_off + jnp.arange(sk)
    q_seg = k_seg = None
    if segs:  # packed rows: segment boundaries inside tiles, equal ids at equal positions
        ids = np.sort(rng.integers(0, 3, (b, sq + sk)), axis=1)
        q_seg, k_seg = jnp.asarray(ids[:, :sq], jnp.int32), jnp.asarray(ids[:, :sk], jnp.int32)
    return dict(q=q, k=k, v=v, do=do, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, causal=causal,
                config=config, noise=noise, rng=rng)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """Inputs, and both kernels' forward and backward (each compiled once)."""
    c = make(request.param)
    pos = (c["q"], c["k"], c["v"], c["q_idx"], c["k_idx"], c["q_seg"], c["k_seg"])
    c["fwd"] = jit(functools.partial(fk.forward, causal=c["causal"], config=c["config"], interpret=True))(*pos)
    c["fwd_ref"] = jit(functools.partial(blk.forward, causal=c["causal"], block_q=16, block_k=16))(*pos)
    o, lse = c["fwd_ref"]
    b, sq, h = lse.shape
    if c["noise"]:  # the global log-sum-exp of a row exceeds this block's; delta is any float
        lse = jnp.logaddexp(lse, jnp.asarray(c["rng"].standard_normal((b, sq, h)), jnp.float32))
    delta = jnp.sum(c["do"] * o, -1) + 0.1 * jnp.asarray(c["rng"].standard_normal((b, sq, h)), jnp.float32)
    bwd_args = (c["q"], c["k"], c["v"], c["do"], lse, delta) + pos[3:]
    c["bwd"] = jit(functools.partial(fk.backward, causal=c["causal"], config=c["config"], interpret=True))(*bwd_args)
    c["bwd_ref"] = jit(functools.partial(blk.backward, causal=c["causal"], block_q=8, block_k=16))(*bwd_args)
    fused = c["config"]._replace(fused_dq="atomic")
    c["bwd_fused"] = jit(functools.partial(fk.backward, causal=c["causal"], config=fused, interpret=True))(*bwd_args)
    return c


def test_forward_equals_xla_blockwise(case):
    (o, lse), (o_ref, lse_ref) = case["fwd"], case["fwd_ref"]
    assert o.dtype == lse.dtype == jnp.float32 and o.shape == o_ref.shape and lse.shape == lse_ref.shape
    assert rel_err(o, o_ref) < TOL
    empty = np.isneginf(np.asarray(lse_ref))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert np.max(np.abs(np.asarray(lse)[~empty] - np.asarray(lse_ref)[~empty])) < TOL
    assert not np.any(np.asarray(o)[empty])  # rows that see no key: o = 0


@pytest.mark.parametrize("which", ["bwd", "bwd_fused"])
def test_backward_equals_xla_blockwise(case, which):
    for got, want, name in zip(case[which], case["bwd_ref"], ("dq", "dk", "dv")):
        assert got.dtype == jnp.float32 and got.shape == want.shape, name
        assert rel_err(got, want) < TOL, name


def test_forward_equals_float64_numpy(case):
    c = {k: np.asarray(v, np.float64) if isinstance(v, jax.Array) else v for k, v in case.items()}
    b, sq, h, d = c["q"].shape
    g = h // c["k"].shape[2]
    k, v = np.repeat(c["k"], g, axis=2), np.repeat(c["v"], g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", c["q"], k) / np.sqrt(d)
    mask = np.ones((1, sq, k.shape[1]), bool)
    if c["causal"]:
        mask = mask & (c["k_idx"][None, :] <= c["q_idx"][:, None])[None]
    if c["q_seg"] is not None:
        mask = mask & (c["q_seg"][:, :, None] == c["k_seg"][:, None, :])
    s = np.where(mask[:, None], s, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.log(np.exp(s).sum(-1))  # [b, h, q]
        o = np.nan_to_num(np.einsum("bhqk,bkhd->bqhd", np.exp(s - lse[..., None]), v))
    got_o, got_lse = case["fwd"]
    np.testing.assert_allclose(got_o, o, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(got_lse, lse.transpose(0, 2, 1), atol=1e-5, rtol=1e-6)


def test_ring_with_pallas_kernel_equals_dense_attention():
    """A 4-device zigzag ring (causal, GQA, segments), every step's block through the Pallas kernels."""
    n, b, s, h, kvh, d = 4, 1, 128, 2, 1, 16
    rng = np.random.default_rng(1)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v, cot = f(b, s, h, d), f(b, s, kvh, d), f(b, s, kvh, d), f(b, s, h, d)
    seg = jnp.asarray(np.repeat([1, 2, 3], [40, 50, 38])[None], jnp.int32)
    c = s // (2 * n)
    order = np.concatenate([np.arange(c) + j * c for i in range(n) for j in (i, 2 * n - 1 - i)])
    mesh = jax.make_mesh((n,), ("context",), (AxisType.Auto,), devices=jax.devices()[:n])

    def ring(q, k, v):
        local = lambda q, k, v, s: R.ring_attention(q, k, v, s, s, axis_name="context", kernel=SMALL)  # noqa: E731
        args = (q[:, order], k[:, order], v[:, order], seg[:, order])
        out = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "context"),) * 4, out_specs=P(None, "context"),
                            check_vma=False)(*args)
        return out[:, np.argsort(order)]

    def value_and_grads(fn, q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot)

    out, grads = jit(functools.partial(value_and_grads, ring))(q, k, v)
    dense = lambda q, k, v: A.reference(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)  # noqa: E731
    want, want_grads = jit(functools.partial(value_and_grads, dense))(q, k, v)
    assert rel_err(out, want) < 2e-6
    for got, ref in zip(grads, want_grads):
        assert rel_err(got, ref) < 2e-6


def test_kernel_choice_and_refusals():
    bf16 = jnp.bfloat16
    assert R.block_kernel("auto", (4096, 2048), 128, bf16) == ("xla" if jax.default_backend() != "gpu" else fk.Config())
    assert R.block_kernel("auto", (4096, 2048), 128, jnp.float32) == "xla"
    assert R.block_kernel("pallas", (64,), 16, bf16) == fk.Config() and R.block_kernel(SMALL, (64,), 16, bf16) is SMALL
    assert fk.supports((8192, 4096), 128) and fk.supports((64,), 80)
    assert not fk.supports((96,), 64) and not fk.supports((8,), 64) and not fk.supports((8192,), 256)
    with pytest.raises(ValueError, match="ring kernel 'cuda' is unknown"):
        R.block_kernel("cuda", (64,), 16, bf16)
    x = jnp.zeros((1, 96, 2, 16))
    with pytest.raises(ValueError, match="cuts a length of 96 into tiles of 96"):
        fk.forward(x, x, x, jnp.arange(96), jnp.arange(96), interpret=True)
    x = jnp.zeros((1, 64, 2, 16))
    with pytest.raises(ValueError, match="fused_dq='yes' is unknown"):
        fk.backward(x, x, x, x, x[..., 0], x[..., 0], jnp.arange(64), jnp.arange(64),
                    config=SMALL._replace(fused_dq="yes"), interpret=True)
    with pytest.raises(ValueError, match="positive scale"):
        fk.forward(x, x, x, jnp.arange(64), jnp.arange(64), scale=-1.0, config=SMALL, interpret=True)


def test_triton_lowering_for_cuda_without_a_gpu():
    """Forward and backward lower to Triton calls for an H200 (bf16, GQA, segments, causal and not): one
    forward call, two backward calls (dk/dv, dq), one for the fused-dq backward."""
    b, s, h, kvh, d = 1, 256, 4, 2, 128
    sd = jax.ShapeDtypeStruct
    bf, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    args = (sd((b, s, h, d), bf), sd((b, s, kvh, d), bf), sd((b, s, kvh, d), bf), sd((b, s, h, d), bf),
            sd((b, s, h), f32), sd((b, s, h), f32), sd((s,), i32), sd((s,), i32), sd((b, s), i32), sd((b, s), i32))

    def fwd(q, k, v, do, lse, delta, qi, ki, qs, ks, causal, config):
        return fk.forward(q, k, v, qi, ki, qs if causal else None, ks if causal else None, causal=causal,
                          config=config, interpret=False)

    def bwd(q, k, v, do, lse, delta, qi, ki, qs, ks, causal, config):
        return fk.backward(q, k, v, do, lse, delta, qi, ki, qs if causal else None, ks if causal else None,
                           causal=causal, config=config, interpret=False)

    with h200():
        for causal in (True, False):
            for fn, calls, config in ((fwd, 1, fk.Config()), (bwd, 2, fk.Config()), (bwd, 1, fk.Config(fused_dq="atomic"))):
                fn = functools.partial(fn, causal=causal, config=config)
                lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
                assert lowered.as_text().count("__gpu$xla.gpu.triton") == calls
