"""Blockwise attention in XLA that returns and consumes a float32 log-sum-exp.

The per-block kernel of Ring Attention (Liu, Zaharia & Abbeel 2023, ``parallel/ring_attention.py``),
computed the FlashAttention way (Dao 2023, FlashAttention-2, algorithms 1 and 2): the query block is
cut into chunks of ``block_q`` rows and the key/value block into chunks of ``block_k``; for each query
chunk an online softmax runs over the key chunks, so no more than a [block_q, block_k] tile of scores
per head exists at a time. For a query row i of the block, over the keys j of the block:

    s_ij = q_i . k_j * scale   (masked: -inf)        lse_i = log sum_j exp(s_ij)
    o_i  = sum_j exp(s_ij - lse_i) v_j

and, given the cotangent do and the *global* log-sum-exp L and delta_i = do_i . o_i of the whole
attention row (of which this block is a part), the block's share of the gradients:

    p_ij = exp(s_ij - L_i)   dv_j = sum_i p_ij do_i   ds_ij = p_ij (do_i . v_j - delta_i)
    dq_i = scale sum_j ds_ij k_j                      dk_j = scale sum_i ds_ij q_i

Shapes: q [batch, sq, heads, head_dim]; k, v [batch, sk, kv_heads, head_dim] (grouped-query heads:
heads a multiple of kv_heads); lse, delta [batch, sq, heads] float32. The mask is given by integer
positions q_idx [sq], k_idx [sk] (causal: k_idx <= q_idx) and optional segment ids q_seg [batch, sq],
k_seg [batch, sk] (equal ids only). Positions must increase along each block, so a (query chunk, key
chunk) tile that the causal mask hides entirely is recognised from its ends and skipped. Scores,
softmax statistics and all outputs are float32; probabilities enter the second matmul in v's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def fill(shape, value, like) -> jax.Array:
    """float32 ``value`` of ``shape``, broadcast from a scalar that an ``optimization_barrier`` ties to
    ``like`` (an input): computed where it is used, not hoisted as a constant residual (see ``loop``)."""
    return jnp.broadcast_to(jax.lax.optimization_barrier((jnp.float32(value), like))[0], shape)


def loop(n: int, body, init):
    """``body(i, carry) -> carry`` for i = 0..n-1 as a ``while_loop`` (the body alone when n == 1).

    Not a ``scan``: inside a differentiated ``lax.scan`` (the layer stack) JAX partially evaluates
    the scans it finds, even inside a ``custom_vjp``'s forward, and stacks whatever their bodies
    compute from constants alone (masks, fills) over the iterations, as residuals: [steps, tiles...]
    arrays whose size grows with the whole sequence. A ``while_loop`` keeps no per-iteration values."""
    if n == 1:
        return body(jnp.int32(0), init)
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])), (jnp.int32(0), init))[1]


def chunk_size(n: int, block: int) -> int:
    """The tile length for a length-``n`` axis: the largest divisor of ``n`` up to ``block`` (``n`` itself
    when n <= block); ValueError when that is below block / 8 (tiles too small to be efficient)."""
    if n <= block:
        return n
    size = max(t for t in range(1, block + 1) if n % t == 0)
    if size < block // 8:
        raise ValueError(f"a block of {n} positions splits into tiles of at most {size} (of the attention block "
                         f"size {block}); use a sequence length with a divisor near {block}, e.g. a multiple of it.")
    return size


def _split(x, n_chunks: int, axis: int = 1):
    """[b, n, ...] -> [n_chunks, b, n / n_chunks, ...] along ``axis`` (chunks first, indexed by ``loop``)."""
    shape = x.shape
    x = x.reshape(*shape[:axis], n_chunks, shape[axis] // n_chunks, *shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, axis: int = 1):
    """Inverse of ``_split``."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


def _tile_mask(qi, ki, qs, ks, causal: bool):
    """Boolean [b or 1, 1, 1, tq, tk] for one tile, or None when nothing is masked."""
    mask = None
    if causal:
        mask = (ki[None, :] <= qi[:, None])[None, None, None]
    if qs is not None:
        same = (qs[:, :, None] == ks[:, None, :])[:, None, None]
        mask = same if mask is None else mask & same
    return mask


def _visible(qi, ki, causal: bool):
    """Whether a tile has any position the causal mask leaves (positions increase along the block)."""
    return (ki[0] <= qi[-1]) if causal else jnp.bool_(True)


def _scores(qc, kc, scale):
    """[b, tq, kvh, g, d] x [b, tk, kvh, d] -> float32 [b, kvh, g, tq, tk]."""
    return jnp.einsum("bqkgd,btkd->bkgqt", qc, kc, preferred_element_type=jnp.float32) * scale


def forward(q, k, v, q_idx, k_idx, q_seg=None, k_seg=None, *, causal: bool = True, scale: float | None = None,
            block_q: int = 512, block_k: int = 512):
    """(o float32 [b, sq, heads, d], lse float32 [b, sq, heads]) of one block (the module's first equations).

    Rows that see no key of this block get o = 0 and lse = -inf, so that combining them with other
    blocks' results (``combine``) is exact.
    """
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    tq, tk = chunk_size(sq, block_q), chunk_size(sk, block_k)
    nq, nk = sq // tq, sk // tk
    qg = _split(q.reshape(b, sq, kvh, g, d), nq)
    q_idx_c = q_idx.reshape(nq, tq)
    q_seg_c = None if q_seg is None else _split(q_seg, nq)
    k_c, v_c, k_idx_c = _split(k, nk), _split(v, nk), k_idx.reshape(nk, tk)
    k_seg_c = None if k_seg is None else _split(k_seg, nk)

    def one_query_chunk(i, out):
        qc, qi, qs = qg[i], q_idx_c[i], None if q_seg_c is None else q_seg_c[i]

        def step(j, carry):
            kc, vc, ki, ks = k_c[j], v_c[j], k_idx_c[j], None if k_seg_c is None else k_seg_c[j]

            def attend(carry):
                m, l, acc = carry
                s = _scores(qc, kc, scale)
                mask = _tile_mask(qi, ki, qs, ks, causal)
                if mask is not None:
                    s = jnp.where(mask, s, NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                l = l * alpha + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
                return m_new, l, acc * alpha[..., None] + pv

            return jax.lax.cond(_visible(qi, ki, causal), attend, lambda c: c, carry)

        init = (fill((b, kvh, g, tq), NEG_INF, qc), fill((b, kvh, g, tq), 0.0, qc), fill((b, kvh, g, tq, d), 0.0, qc))
        m, l, acc = loop(nk, step, init)
        o = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l == 0, NEG_INF, jnp.where(m == NEG_INF, 0.0, m) + jnp.log(jnp.where(l == 0, 1.0, l)))
        # [b, kvh, g, tq, d] -> [b, tq, h, d]; [b, kvh, g, tq] -> [b, tq, h]
        o_buf, lse_buf = out
        return (o_buf.at[i].set(jnp.moveaxis(o, 3, 1).reshape(b, tq, h, d)),
                lse_buf.at[i].set(jnp.moveaxis(lse, 3, 1).reshape(b, tq, h)))

    o, lse = loop(nq, one_query_chunk, (fill((nq, b, tq, h, d), 0.0, q), fill((nq, b, tq, h), NEG_INF, q)))
    return _merge(o), _merge(lse)


def backward(q, k, v, do, lse, delta, q_idx, k_idx, q_seg=None, k_seg=None, *, causal: bool = True,
             scale: float | None = None, block_q: int = 512, block_k: int = 512):
    """(dq, dk, dv), float32, of one block given the global ``lse`` and ``delta`` [b, sq, heads] (the
    module's second equations). Loops over key chunks outside (their dk, dv) and query chunks inside
    (accumulating dq)."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    tq, tk = chunk_size(sq, block_q), chunk_size(sk, block_k)
    nq, nk = sq // tq, sk // tk
    to_heads = lambda a: jnp.moveaxis(a.reshape(b, a.shape[1], kvh, g), 1, 3)  # [b,t,h] -> [b,kvh,g,t]  # noqa: E731
    q_c = (_split(q.reshape(b, sq, kvh, g, d), nq), _split(do.reshape(b, sq, kvh, g, d), nq),
           _split(to_heads(lse), nq, axis=3), _split(to_heads(delta), nq, axis=3), q_idx.reshape(nq, tq),
           None if q_seg is None else _split(q_seg, nq))
    kv_c = (_split(k, nk), _split(v, nk), k_idx.reshape(nk, tk), None if k_seg is None else _split(k_seg, nk))

    def one_key_chunk(j, carry):
        dq_buf, dk_buf, dv_buf = carry
        kc, vc, ki, ks = (None if a is None else a[j] for a in kv_c)

        def step(i, carry):
            qc, doc, lc, dc, qi, qs = (None if a is None else a[i] for a in q_c)

            def grads(carry):
                dk, dv, dq_buf = carry
                s = _scores(qc, kc, scale)
                p = jnp.exp(s - jnp.where(lc == NEG_INF, 0.0, lc)[..., None])
                mask = _tile_mask(qi, ki, qs, ks, causal)
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                dv = dv + jnp.einsum("bkgqt,bqkgd->btkd", p.astype(doc.dtype), doc, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgd,btkd->bkgqt", doc, vc, preferred_element_type=jnp.float32)
                ds = p * (dp - dc[..., None])
                dq = jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(kc.dtype), kc, preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(qc.dtype), qc, preferred_element_type=jnp.float32)
                return dk, dv, dq_buf.at[i].add(dq * scale)

            return jax.lax.cond(_visible(qi, ki, causal), grads, lambda c: c, carry)

        zeros = fill((b, tk, kvh, d), 0.0, kc)
        dk, dv, dq_buf = loop(nq, step, (zeros, zeros, dq_buf))
        return dq_buf, dk_buf.at[j].set(dk * scale), dv_buf.at[j].set(dv)

    init = (fill((nq, b, tq, kvh, g, d), 0.0, q), fill((nk, b, tk, kvh, d), 0.0, k), fill((nk, b, tk, kvh, d), 0.0, k))
    dq, dk, dv = loop(nk, one_key_chunk, init)
    return _merge(dq).reshape(b, sq, h, d), _merge(dk), _merge(dv)


def combine(state, o_blk, lse_blk):
    """Online softmax over blocks: fold one block's (o, lse) into the running float32 (max m,
    denominator l, numerator acc) of each row: m' = max(m, lse_b), l' = l e^(m - m') + e^(lse_b - m'),
    acc' = acc e^(m - m') + o_b e^(lse_b - m'). state: (m, l [b, s, h], acc [b, s, h, d])."""
    m, l, acc = state
    m_new = jnp.maximum(m, lse_blk)
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    alpha, beta = jnp.exp(m - m_safe), jnp.exp(lse_blk - m_safe)
    return m_new, l * alpha + beta, acc * alpha[..., None] + o_blk * beta[..., None]


def init_state(b: int, s: int, h: int, d: int, like):
    """The empty running state of ``combine``: m = -inf, l = 0, acc = 0 (``fill``ed after ``like``)."""
    return fill((b, s, h), NEG_INF, like), fill((b, s, h), 0.0, like), fill((b, s, h, d), 0.0, like)


def finish(state):
    """(o float32 [b, s, h, d], lse float32 [b, s, h]) from a running state: o = acc / l, lse = m + log l."""
    m, l, acc = state
    safe_l = jnp.where(l == 0, 1.0, l)
    lse = jnp.where(l == 0, NEG_INF, jnp.where(m == NEG_INF, 0.0, m) + jnp.log(safe_l))
    return acc / safe_l[..., None], lse
