"""What one Mamba decoding step does, per layer, for each decoding path (CPU, no GPU needed; seconds).

    python -m experiments.mamba_decode_ops            # d_model 1024, E 2048, N 16, batch 64 (bench_mamba_370m)

For one greedy step of ``generate``'s loop (``apply`` on one token with the cache, inside a loop so
that XLA treats weights and cache as loop-carried) over 4 layers, three paths:

  stacked   the training layout: a ``lax.scan`` over the stacked [layers, ...] weights and cache
  xla       ``decode_params``' per-layer weights, each layer replacing its cache slot, XLA step
  pallas    the same with ``step_kernel``'s conv and state kernels (lowered for CPU in interpret mode,
            so only the jaxpr columns are meaningful for it)

Columns, per layer and step (the jaxpr inside the decoding loop; backend independent): equations
that slice a weight or a cache slot out of a stacked [layers, ...] array (a weight slice feeding a
matmul is a copy of the weight on a GPU: XLA's GEMMs take whole buffers), that produce a
state-sized [b, E, N] float32 array (each a pass over 8 MB at b64 unless XLA fuses it), and Pallas
kernels (each reads and writes its state once).
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp

from models import mamba as M

L, B = 3, 64  # 3 layers: no other axis of these shapes has length 3


def step_fn(cfg, per_layer: bool):
    def step(params, tok, cache):
        p = M.decode_params(params, cfg) if per_layer else params

        def body(_, carry):
            tok, cache = carry
            logits, aux = M.apply(p, tok, cfg, segment_ids=jnp.ones((B, 1), jnp.int32), cache=cache)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], aux["cache"]

        return jax.lax.fori_loop(0, jnp.int32(2), body, (tok, cache))
    return step


def jaxpr_counts(jaxpr, cfg) -> collections.Counter:
    """Per-step counts inside the decoding loop (a ``while`` body; a ``scan`` body counts ``length`` times)."""
    E, N = cfg.d_inner, cfg.d_state
    counts = collections.Counter()

    def visit(jx, mult, in_loop):
        for eqn in jx.eqns:
            name = eqn.primitive.name
            ins = [v.aval for v in eqn.invars if hasattr(v, "aval") and hasattr(v.aval, "shape")]
            stacked = in_loop and ins and ins[0].shape[:1] == (L,)
            if stacked and name in ("dynamic_slice", "slice", "squeeze", "gather", "index_in_dim"):
                counts["cache slices" if len(ins[0].shape) == 4 else "weight slices"] += mult
            if in_loop and name == "pallas_call":
                counts["pallas kernels"] += mult
                continue
            if in_loop and any(getattr(v.aval, "shape", None) == (B, E, N) and v.aval.dtype == jnp.float32
                               for v in eqn.outvars):
                counts["state ops"] += mult
            if in_loop and name == "scan":  # each iteration slices its xs (the stacked weights and cache) itself
                for v in eqn.invars[eqn.params["num_consts"] + eqn.params["num_carry"]:]:
                    if v.aval.shape[:1] != (L,):
                        continue
                    kind = "cache slices" if len(v.aval.shape) == 4 else "weight slices"
                    counts[kind] += mult * eqn.params["length"]
            sub_mult = mult * (eqn.params.get("length", 1) if name == "scan" else 1)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub, sub_mult, in_loop or name == "while")

    visit(jaxpr.jaxpr, 1, False)
    return counts


def main():
    cfg = M.Config(vocab_size=32000, d_model=1024, n_layers=L, d_state=16, d_conv=4, expand=2, dtype="bfloat16",
                   param_dtype="bfloat16", scan="pallas", decode="xla")
    params = jax.eval_shape(lambda: M.init(cfg, jax.random.PRNGKey(0)))
    cache = jax.eval_shape(lambda: M.init_cache(cfg, B))
    tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)
    print(f"one decoding step, b{B}, d_model {cfg.d_model}, E {cfg.d_inner}, N {cfg.d_state}; counts per layer")
    print(f"{'path':<10}{'weight slices':>15}{'cache slices':>14}{'[b,E,N] f32 ops':>17}{'pallas kernels':>16}")
    for name, per_layer, decode in (("stacked", False, "xla"), ("xla", True, "xla"), ("pallas", True, "pallas")):
        c = dataclasses.replace(cfg, decode=decode)
        jc = jaxpr_counts(jax.make_jaxpr(step_fn(c, per_layer))(params, tok, cache), c)
        per = lambda n: f"{n / L:.1f}"  # noqa: E731
        print(f"{name:<10}{per(jc['weight slices']):>15}{per(jc['cache slices']):>14}{per(jc['state ops']):>17}"
              f"{per(jc['pallas kernels']):>16}")


if __name__ == "__main__":
    main()
