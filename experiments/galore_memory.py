"""Optimizer-state memory of the 1.26B config (experiments/bench_llama_1b.py): AdamW vs GaLore at ranks
256 and 512, counted from the optimizer state's pytree (``jax.eval_shape`` of the trainer's own init,
nothing allocated) and from the analytic formula, which must agree within 1%.

    python experiments/galore_memory.py        # CPU, a few seconds

Analytic count (float32 state, d = d_model, f = d_ff, q = n_heads * head_dim, k = n_kv_heads * head_dim,
L layers, V vocabulary, r the rank): AdamW keeps two moments of every parameter. GaLore keeps, for each
selected m x n matrix (per layer: wq d x q, wk and wv d x k, wo q x d, w_gate and w_up d x f, w_down
f x d), the moments in the projected space and the projector: m >= n: 2 m r + n r; m < n: 2 r n + m r;
the embedding, the LM head and the norms (not projected) keep full-size moments.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_llama_1b  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402
from train.setup import setup_training  # noqa: E402


def counted_bytes(config) -> int:
    """Bytes of every array of the optimizer state the trainer would build for ``config`` (shapes only)."""
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(setup.state_shape.opt_state))


def analytic_bytes(m, rank: int | None) -> int:
    """The formula above for model config ``m`` (``config.model``); rank None: AdamW. Counters left out."""
    head_dim = m.head_dim or m.d_model // m.n_heads
    d, f, q, k = m.d_model, m.d_ff, m.n_heads * head_dim, m.n_kv_heads * head_dim
    matrices = [(d, q), (d, k), (d, k), (q, d), (d, f), (d, f), (f, d)]
    other = m.vocab_size * d * (1 if m.tie_embeddings else 2) + d * (2 * m.n_layers + 1)  # embed, head, norms
    if rank is None:
        per_layer = sum(2 * a * b for a, b in matrices)
    else:
        per_layer = sum(2 * a * rank + b * rank if a >= b else 2 * rank * b + a * rank for a, b in matrices)
    return 4 * (m.n_layers * per_layer + 2 * other)


def rows(ranks=(256, 512)):
    base = bench_llama_1b.get_config()
    out = [("AdamW", counted_bytes(base), analytic_bytes(base.model, None))]
    for r in ranks:
        c = bench_llama_1b.get_config()
        c.optim.update(name="galore", galore_rank=r)
        out.append((f"GaLore r={r}", counted_bytes(c), analytic_bytes(c.model, r)))
    return out


def main():
    table = rows()
    adamw = table[0][1]
    print("1.26B config (experiments/bench_llama_1b.py), float32 optimizer state\n")
    print("| optimizer | state GB (pytree) | state GB (analytic) | pytree / analytic - 1 | vs AdamW |")
    print("|---|---:|---:|---:|---:|")
    for name, counted, analytic in table:
        print(f"| {name} | {counted / 1e9:.3f} | {analytic / 1e9:.3f} | {counted / analytic - 1:+.4%} | "
              f"{counted / adamw - 1:+.1%} |")
    worst = max(abs(c / a - 1) for _, c, a in table)
    assert worst < 0.01, f"pytree and analytic counts differ by {worst:.2%}"


if __name__ == "__main__":
    main()
