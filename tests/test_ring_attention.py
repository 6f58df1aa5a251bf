"""Ring Attention (parallel/ring_attention.py, models/block_attention.py) on 8 host CPU devices.

Outputs and gradients of the ring (inside ``shard_map`` over a 4-device ``context`` axis) equal
dense float32 attention (``models.attention.reference`` for the causal mask; the same einsums
without the causal term otherwise) to 2e-6 relative error (rings of 2 and 3 devices as well), for
causal and non-causal masks, MHA and GQA, with and without segment ids, in the contiguous and the
balanced (zigzag) layouts; the blockwise kernel alone with tiles smaller than the block. A Transformer's
loss and gradients with attention='ring' on a data=2 x context=4 mesh equal full attention on one device.
Bad input fails with one sentence before compiling.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from models import attention as A
from models import block_attention as blk
from models import transformer as T
from parallel import mesh as pmesh
from parallel import ring_attention as R
from parallel import sharding
from tests import parallel_worker as W
from tests.helpers import FAST_COMPILE, jit, rel_err
from train import config as tconfig
from train import objective
from train import step as tstep

pytestmark = pytest.mark.timeout(60)

N, B, S, H, D = 4, 2, 32, 4, 8  # ring size, batch, sequence, query heads, head dim
TOL = 2e-6


def dense(q, k, v, seg, causal):
    """Float32 softmax attention with an explicit mask: the independent reference."""
    if causal:
        return A.reference(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    b, s, h, d = q.shape
    kvh = k.shape[2]
    logits = jnp.einsum("bskgd,btkd->bkgst", q.reshape(b, s, kvh, h // kvh, d), k) / np.sqrt(d)
    if seg is not None:
        logits = jnp.where((seg[:, :, None] == seg[:, None, :])[:, None, None], logits, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bkgst,btkd->bskgd", jax.nn.softmax(logits, axis=-1), v)
    return out.reshape(b, s, h, d)


def inputs(kv_heads: int, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, S, H, D))
    k, v = (jax.random.normal(key, (B, S, kv_heads, D)) for key in ks[1:3])
    cot = jax.random.normal(ks[3], (B, S, H, D))
    # Packed rows: segments of uneven lengths, boundaries inside the devices' blocks.
    seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [5, 13, 14]), np.repeat([1, 2], [20, 12])]), jnp.int32)
    return q, k, v, cot, seg


def zigzag_order(s: int, n: int) -> np.ndarray:
    """The global positions of the zigzag layout, device after device (chunks i and 2n-1-i)."""
    c = s // (2 * n)
    return np.concatenate([np.arange(c) + j * c for i in range(n) for j in (i, 2 * n - 1 - i)])


def ring_mesh(n: int = N):
    return jax.make_mesh((n,), ("context",), (AxisType.Auto,), devices=jax.devices()[:n])


def value_and_grads(fn, q, k, v, cot):
    """(out, (dq, dk, dv)) of sum(fn(q, k, v) * cot)."""
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot)


def check_ring(q, k, v, cot, seg, causal, layout, block, n=N):
    """The ring over ``n`` devices equals dense attention: outputs and the three gradients."""
    s = q.shape[1]
    order = zigzag_order(s, n) if layout == "zigzag" else np.arange(s)
    spec = P(None, "context")

    def ring(q, k, v):
        def local(q, k, v, *sg):
            sg = sg[0] if sg else None
            return R.ring_attention(q, k, v, sg, sg, axis_name="context", causal=causal, layout=layout,
                                    block_q=block, block_k=block)
        args = (q[:, order], k[:, order], v[:, order]) + ((seg[:, order],) if seg is not None else ())
        out = jax.shard_map(local, mesh=ring_mesh(n), in_specs=(spec,) * len(args), out_specs=spec,
                            check_vma=False)(*args)
        return out[:, np.argsort(order)]

    out, grads = jit(lambda *a: value_and_grads(ring, *a))(q, k, v, cot)
    want, want_grads = jit(lambda *a: value_and_grads(lambda q, k, v: dense(q, k, v, seg, causal), *a))(q, k, v, cot)
    assert rel_err(out, want) < TOL
    for got, ref in zip(grads, want_grads):
        assert rel_err(got, ref) < TOL
    assert grads[1].shape == k.shape


# (causal, layout, kv_heads, segments, block): every feature both ways across four compiled rings.
CASES = {
    "causal-zigzag-gqa-seg-tiled": (True, "zigzag", 2, True, 4),
    "causal-contiguous-mha": (True, "contiguous", 4, False, 512),
    "noncausal-zigzag-gqa": (False, "zigzag", 2, False, 512),
    "noncausal-contiguous-mha-seg": (False, "contiguous", 4, True, 512),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ring_equals_full_attention(name):
    causal, layout, kvh, segs, block = CASES[name]
    q, k, v, cot, seg = inputs(kvh)
    check_ring(q, k, v, cot, seg if segs else None, causal, layout, block)


@pytest.mark.parametrize("n", [2, 3])
def test_ring_sizes(n):
    """Rings of 2 and 3 devices (the backward's dK, dV accumulator then takes no loop, or a loop of one
    step, where 4 devices take a while loop): causal zigzag with segments, on 30 positions for 3."""
    q, k, v, cot, seg = (x[:, :30 if n == 3 else S] for x in inputs(2, seed=n))
    check_ring(q, k, v, cot, seg, True, "zigzag", 512, n=n)


def test_blockwise_kernel_alone_with_tiles():
    """One device: tiles of 8 queries x 4 keys (skipped above the diagonal), GQA, segments."""
    q, k, v, cot, seg = inputs(2, seed=3)
    fn = lambda q, k, v: R.ring_attention(q, k, v, seg, seg, block_q=8, block_k=4)  # noqa: E731
    out, grads = jit(lambda *a: value_and_grads(fn, *a))(q, k, v, cot)
    want, want_grads = jit(lambda *a: value_and_grads(lambda q, k, v: dense(q, k, v, seg, True), *a))(q, k, v, cot)
    assert rel_err(out, want) < TOL
    for got, ref in zip(grads, want_grads):
        assert rel_err(got, ref) < TOL
    # The log-sum-exp is float32 and exact: log sum_j exp(s_ij) over the visible keys.
    idx = jnp.arange(S)
    o, lse = blk.forward(q, k, v, idx, idx, seg, seg, block_q=8, block_k=4)
    assert lse.dtype == jnp.float32 and lse.shape == (B, S, H)
    logits = np.einsum("bshd,bthd->bhst", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2))
    mask = (np.arange(S)[None, :] <= np.arange(S)[:, None]) & (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None])
    logits = np.where(mask[:, None], logits / np.sqrt(D), -np.inf)
    want_lse = np.log(np.exp(logits).sum(-1)).transpose(0, 2, 1)
    assert np.max(np.abs(np.asarray(lse) - want_lse)) < 1e-5


def test_zigzag_moves_the_sequence_and_back():
    mesh = pmesh.make_mesh({"data": 2, "context": N})
    x = jnp.arange(2 * S * 3).reshape(2, S, 3)
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        there = jax.jit(R.zigzag)(x)
        back = jax.jit(R.unzigzag)(there)
    np.testing.assert_array_equal(np.asarray(there), np.asarray(x)[:, zigzag_order(S, N)])
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_transformer_loss_and_gradients_ring_equal_full_attention():
    """The LM objective's loss and gradients of a packed batch (segments, positions, padding): ring on a
    data=2 x context=4 mesh (zigzag layout inside the layer stack, and the contiguous one) vs full attention
    on one device."""
    mcfg = dataclasses.replace(W.tiny_config(), remat="none")
    batch = {k: jnp.asarray(v) for k, v in W.make_batches(mcfg.vocab_size)[0].items()}
    params = jit(T.init, static_argnums=0)(mcfg, jax.random.PRNGKey(0))
    grad_fn = lambda cfg: tstep.make_grad_fn(T, cfg, objective.lm_objective())  # noqa: E731
    want, want_grads = jit(lambda p, b: grad_fn(mcfg)(p, b, None))(params, batch)
    mesh = pmesh.make_mesh({"data": 2, "context": N})
    rules = sharding.DEFAULT_RULES
    for layout in R.LAYOUTS:
        ring_cfg = dataclasses.replace(mcfg, attention="ring", ring_layout=layout)
        with sharding.activate(mesh, rules):
            sh = sharding.batch_sharding(mesh, rules)
            got, grads = jax.jit(lambda p, b: grad_fn(ring_cfg)(p, b, None), compiler_options=FAST_COMPILE,
                                 in_shardings=(None, sh))(params, batch)
        assert abs(float(got.total) - float(want.total)) < 1e-5 * abs(float(want.total)), layout
        for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
            assert rel_err(g, r) < 1e-5, (layout, jax.tree_util.keystr(path))


def test_cached_decoding_takes_full_attention():
    q, k, v, _, _ = inputs(2)
    got, want = jit(lambda q, k, v: (R.attend(q, k, v, q_start=5), A.reference(q, k, v, q_start=5)))(q[:, :1], k, v)
    np.testing.assert_allclose(got, want, atol=1e-6)


def ring_config(seq_len=48, context=4, **model):
    c = tconfig.base_config()
    c.model.update({"attention": "ring", **model})
    c.mesh.update(data=2, context=context)
    c.train.seq_len = seq_len
    return c


@pytest.mark.parametrize("make, match", [
    (lambda: tconfig.validate(ring_config(seq_len=36)),
     r"train.seq_len \(36\) is not divisible by 8 \(2 x the 4 devices of the context ring"),
    (lambda: tconfig.validate(ring_config(ring_layout="striped")), r"model.ring_layout is 'striped'; use one of"),
    (lambda: tconfig.validate(ring_config(seq_len=38, ring_layout="contiguous")),
     r"train.seq_len \(38\) is not divisible by 4 \(the 4 devices"),
    (lambda: pmesh.make_mesh({"data": -1, "context": 16}),
     r"context=16 cannot cover 8 devices"),
    (lambda: R.check_length(12, 8, "contiguous"), r"\(12\) is not divisible by 8 \(the 8 devices"),
    (lambda: R.ring_attention(jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 4, 2, 4)), jnp.zeros((1, 4, 2, 4))),
     r"query and key blocks of one length"),
    (lambda: R.ring_attention(*(jnp.zeros((1, 8, 2, 4)),) * 3, jnp.zeros((1, 8), jnp.int32)),
     r"segment ids for both or neither"),
    (lambda: R.ring_attention(*(jnp.zeros((1, 8, 2, 4)),) * 3, layout="striped"), r"ring layout 'striped'"),
    (lambda: blk.chunk_size(1031, 512), r"a block of 1031 positions splits into tiles of at most 1"),
    (lambda: tconfig.validate(ring_config(attention="rings")), r"model.attention is 'rings'"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_valid_ring_config_passes():
    assert tconfig.validate(ring_config()).attention == "ring"

