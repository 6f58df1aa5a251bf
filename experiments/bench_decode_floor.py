"""The floor of a decoding step that runs one kernel per dependent stage: every stage of the step replaced by a
kernel that only moves that stage's bytes, chained as the step chains them.

    python -m experiments.bench_decode_floor            # the 1.26B at batch 1, Mamba 370M at batch 64 (one GPU)
    python -m experiments.bench_decode_floor --tiny     # tiny shapes on CPU (interpreted kernels), seconds

A stage's bytes come from the model's own (abstract) parameters and cache: the 1.26B config
(``experiments/bench_llama_1b.py``; bf16, and int4 g128 as ``bench_quant``'s "int4 g128 layer" stores it) at batch 1
with 768 cache slots (a 512-token prompt and 256 new tokens), and ``experiments/bench_mamba_370m.py`` at batch 64
(float32 and bf16 state). A read stage is one kernel that reads its buffer and writes one sum per 8 KB row; a
read-write stage (Mamba's conv buffer and state, updated in place) adds a scalar to its buffer in place. Each kernel
takes its predecessor's output, so no kernel starts before the previous one ends, as in the step. Per model,
three chains a layer:

    loom's layer   the kernels of one layer of loom's batch-1 Transformer step (``model.decode="auto"``): the
                   qkv product, the attention's split and combine, W_o, W_gate_up, W_down, and for int4 the sums
                   of W_o's and W_down's K splits (``decode_matmul.plan``); the step's other kernels (the embedding
                   gather, the loop's bookkeeping) are left out, so the chain can only be faster than the step;
    5 stages       the fewest a layer can have when each kernel needs all of the previous one's output: qkv,
                   attention, W_o, W_gate_up, W_down (Mamba: in_proj, conv, x_proj, the state update, out_proj);
    1 kernel       all of a layer's bytes in one kernel, which only a kernel that synchronises its programs
                   between the stages could run;

plus the final norm and head and one small kernel (the argmax) a step. Read stages run as Pallas kernels and as
XLA's row reductions; the table gives both and the step's bytes against an elementwise copy measured in the same
process: every parameter of the layers and the head, and the per-layer cache, read once (with bf16 weights within
0.5% of ``train.bench.bench_decode``'s count, which takes the matmul weights and every cache array; the int4
weights' bytes are ``bench_quant``'s).
``--steps`` steps a call in a device loop; the fastest of ``--reps`` calls.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from models.flash_kernel import compiler_params
from models.quant import tree_bytes
from train import bench, cli

SMALL = 64e3  # bytes read by a small kernel: the attention's combine, a split sum, the argmax

RW_NAMES = ("cache:conv", "cache:ssm")  # cache parts a step updates in place: read and written
# Per layer, each stage's parameters (and cache parts, ``cache:``) by name; "small" stages move SMALL bytes, "int4"
# ones too but only in the int4 model.
TRANSFORMER = {
    "loom's layer": [("qkv", ("attn_norm", "wq", "wk", "wv")), ("attention", ("cache:k", "cache:v")),
                     ("combine", "small"), ("W_o", ("wo",)), ("W_o sum", "int4"),
                     ("W_gate_up", ("mlp_norm", "w_gate", "w_up")), ("W_down", ("w_down",)), ("W_down sum", "int4")],
    "5 stages": [("qkv", ("attn_norm", "wq", "wk", "wv")), ("attention", ("cache:k", "cache:v")), ("W_o", ("wo",)),
                 ("W_gate_up", ("mlp_norm", "w_gate", "w_up")), ("W_down", ("w_down",))],
}
MAMBA = {
    "5 stages": [("in_proj", ("norm", "in_x", "in_z")), ("conv", ("conv_w", "conv_b", "cache:conv")),
                 ("x_proj", ("x_proj",)), ("state", ("dt_proj", "dt_bias", "A_log", "D", "cache:ssm")),
                 ("out_proj", ("out_proj",))],
}


def step_parts(params, cache, head) -> tuple[dict, int, int]:
    """({name: bytes of one layer}, layers, the head's bytes): params["layers"]'s leaves and the cache's per-layer
    arrays (``cache:NAME``); the head's weight with the final norm."""
    layers = jax.tree.leaves(params["layers"])[0].shape[0]
    sizes = {k: tree_bytes(v) // layers for k, v in params["layers"].items()}
    sizes.update({f"cache:{k}": tree_bytes(v) // layers for k, v in cache.items() if v.ndim >= 3})
    return sizes, layers, tree_bytes(head) + tree_bytes(params["final_norm"])


def chain(structure, sizes: dict, layers: int, head_bytes: int, int4: bool) -> list[tuple[str, float]]:
    """[(kind, bytes)] of one step: kind "r" (read) or "rw" (read and written in place). ``structure``: a layer's
    stages, each of which must take its parts of ``sizes`` (ValueError naming what no stage or two take), or None:
    one kernel a layer (reading the parts a stage updates in place twice: read and written)."""
    if structure is None:
        layer = [("r", sum(sizes.values()) + sum(v for k, v in sizes.items() if k in RW_NAMES))]
    else:
        layer, taken = [], []
        for stage, parts in structure:
            if parts == "small" or (parts == "int4" and int4):
                layer.append(("r", SMALL))
            elif parts != "int4":
                if set(parts) - set(sizes):
                    raise ValueError(f"stage {stage!r} takes {sorted(set(parts) - set(sizes))}, which a layer does not "
                                     f"hold ({sorted(sizes)})")
                taken += parts
                layer.append(("rw" if set(parts) & set(RW_NAMES) else "r", sum(sizes[p] for p in parts)))
        if sorted(taken) != sorted(sizes):
            raise ValueError(f"stages take {sorted(taken)} but a layer holds {sorted(sizes)}")
    return layer * layers + [("r", head_bytes), ("r", SMALL)]


# ---- the kernels: a buffer is [rows, T] uint32 words; each returns an array whose [:1, :8] the next one takes
def read_kernel(prev, w, interpret):
    """Each program sums one row of w [P, T] and adds prev's first 8 words: reads w once, writes [P, 8]."""
    def kern(prev_ref, w_ref, o_ref):
        s = jnp.sum(w_ref[...], axis=1, keepdims=True) + jnp.sum(prev_ref[...], axis=1, keepdims=True)
        o_ref[...] = jnp.broadcast_to(s, (1, 8))
    p, t = w.shape
    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((p, 8), jnp.uint32), grid=(p,),
                          in_specs=[pl.BlockSpec((1, 8), lambda i: (0, 0)), pl.BlockSpec((1, t), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((1, 8), lambda i: (i, 0)),
                          compiler_params=compiler_params(interpret, 4, 1), interpret=interpret)(prev, w)


def rw_kernel(prev, w, interpret):
    """w + the sum of prev's first 8 words, in place over w [P, T]: reads and writes w once."""
    def kern(prev_ref, w_ref, o_ref):
        o_ref[...] = w_ref[...] + jnp.sum(prev_ref[...], axis=1, keepdims=True)
    p, t = w.shape
    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((p, t), jnp.uint32), grid=(p,),
                          in_specs=[pl.BlockSpec((1, 8), lambda i: (0, 0)), pl.BlockSpec((1, t), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((1, t), lambda i: (i, 0)), input_output_aliases={1: 0},
                          compiler_params=compiler_params(interpret, 4, 1), interpret=interpret)(prev, w)


def xla_read(prev, w):
    s = jnp.sum(w, axis=1, keepdims=True, dtype=jnp.uint32) + jnp.sum(prev[:1, :8])
    return jnp.broadcast_to(s, (w.shape[0], 8))


def run_chain(stages, reads: str, words: int, steps: int, reps: int, interpret: bool, seed: int = 0):
    """(fastest wall seconds a step, the first call's last output [1, 8]) of ``stages`` ([(kind, bytes)]) over
    buffers of random words, ``reads`` "pallas" or "xla"."""
    bufs = tuple(jax.random.bits(jax.random.PRNGKey(seed + i), (max(1, math.ceil(b / 4 / words)), words),
                                 jnp.uint32) for i, (_, b) in enumerate(stages))
    kinds = [k for k, _ in stages]

    def step(_, carry):
        prev, bufs = carry
        bufs = list(bufs)
        for i, kind in enumerate(kinds):
            if kind == "rw":
                prev = bufs[i] = rw_kernel(prev, bufs[i], interpret)
            else:
                prev = read_kernel(prev, bufs[i], interpret) if reads == "pallas" else xla_read(prev, bufs[i])
            prev = prev[:1, :8]
        return prev, tuple(bufs)

    run = jax.jit(lambda c: jax.lax.fori_loop(0, steps, step, c), donate_argnums=0)
    carry = jax.block_until_ready(run((jnp.zeros((1, 8), jnp.uint32), bufs)))
    first = np.asarray(carry[0])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        carry = jax.block_until_ready(run(carry))
        times.append((time.perf_counter() - t) / steps)
    return min(times), first


def models(tiny: bool):
    """[(label, params, cache, the head's weights, structures)] for the 1.26B (bf16, int4 g128) and Mamba 370M
    (float32 and bf16 state): shapes only, nothing allocated."""
    from experiments import bench_mamba_370m, bench_quant
    from models import mamba

    was, bench_quant.TINY = bench_quant.TINY, tiny
    try:
        tmodel, tcfg, variants = bench_quant.model_variants(("bf16", "int4 g128 layer"), abstract=True)
    finally:
        bench_quant.TINY = was
    tcache = jax.eval_shape(lambda: tmodel.init_cache(tcfg, 1, 48 if tiny else 768))
    c = bench_mamba_370m.get_config()
    c.model.param_dtype = "bfloat16"
    if tiny:
        c.model.update(vocab_size=1000, d_model=64, n_layers=2)
    out = []
    for name, p in variants.items():
        out.append((f"1.26B {'int4 g128' if 'int4' in name else name}, batch 1", p, tcache, p["head"], TRANSFORMER))
    for state in ("float32", "bfloat16"):
        c.model.state_dtype = state
        mcfg = mamba.from_config(c.model)
        p = jax.eval_shape(lambda: mamba.init(mcfg, jax.random.PRNGKey(0)))
        cache = jax.eval_shape(lambda: mamba.init_cache(mcfg, 4 if tiny else 64))
        out.append((f"Mamba 370M {state} state, batch {4 if tiny else 64}", p, cache,
                    p["embed"] if mcfg.tie_embeddings else p["head"], MAMBA))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, interpreted kernels")
    ap.add_argument("--steps", type=int, default=8, help="decoding steps a call (a device loop)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls; the fastest counts")
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.reps < 1:
        ap.error(f"--steps {args.steps} and --reps {args.reps}: use at least 1 of each")
    try:
        cli.out_file(args.out)
    except ValueError as e:
        ap.error(str(e))
    if not args.tiny and jax.default_backend() != "gpu":
        ap.error(f"the floor is measured on a GPU (this backend is {jax.default_backend()}); --tiny checks the script "
                 f"at tiny shapes here")
    interpret = args.tiny
    words = 64 if args.tiny else 2048
    copy = bench.copy_bandwidth(2 ** -9 if args.tiny else 2.0)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; copy {copy / 1e12:.2f} TB/s")
    print("| model | chain | kernels a step | GB moved a step | ms a step, Pallas reads | ms, XLA reads | "
          "counted bytes / floor / copy |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for label, params, cache, head, structures in models(args.tiny):
        sizes, layers, head_bytes = step_parts(params, cache, head)
        counted = sum(sizes.values()) * layers + head_bytes
        for name in (*structures, "1 kernel"):
            stages = chain(structures.get(name), sizes, layers, head_bytes, "int4" in label)
            moved = sum(b * (2 if k == "rw" else 1) for k, b in stages)
            ms = {r: 1e3 * run_chain(stages, r, words, args.steps, args.reps, interpret)[0] for r in ("pallas", "xla")}
            rows.append({"model": label, "chain": name, "kernels": len(stages), "moved_bytes": moved,
                         "counted_bytes": counted, **{f"{r}_ms": v for r, v in ms.items()},
                         "of_copy": counted / (min(ms.values()) / 1e3) / copy})
            print(f"| {label} | {name} | {len(stages)} | {moved / 1e9:.3f} | {ms['pallas']:.3f} | {ms['xla']:.3f} | "
                  f"{rows[-1]['of_copy']:.2f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_bytes_per_s": copy, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
