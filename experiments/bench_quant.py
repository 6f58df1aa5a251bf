"""Speed and memory of the quantized weight types on one GPU, for the 1.26B config (experiments/bench_llama_1b.py).

    python experiments/bench_quant.py [--out results.json] [--sections memory,linear,gemv,decode,ops]
        [--gemv_shapes 2048x6144,2048x2048] [--gemv_rows 1] [--decode 'bf16,int4 g128 fused']
        [--decode_ab 'block_n=512,num_warps=8'] [--gemv 'block_n=256'] [--new_tokens 256] [--profile DIR] [--tiny]
        [--attention pallas_decode]

Prints Markdown tables:
  1. ceilings measured in the same job: bf16 matmul TFLOP/s, int8 TOP/s (8192^3), copy GB/s;
  2. memory: bytes of the block linears and of the whole model for bfloat16, W8A8 (int8 + float32 scales)
     and int4 (group 128, float16 scales and zeros: 0.5 + 4/128 bytes per parameter, 0.27x bf16);
  3. one linear at prefill sizes (tokens x in -> out): bf16 ``jnp.dot``, the int8 x int8 -> int32 product
     alone, W8A8 O1 (per-token dynamic activation quantization + the int8 product + rescale), W8A8 O3
     (static scale), int4 weight-only (dequantize, then bf16 matmul);
  4. gemv: the fused int4 kernel ``int4_kernel.int4_gemv`` at decoding sizes (--gemv_rows, default one row) for the
     1.26B config's decoding shapes (--gemv_shapes, default all five: ``decode_params`` joins W_q, W_k, W_v
     into 2048x6144 and W_gate, W_up into 2048x11264; W_o 2048x2048, W_down 5632x2048; the head 2048x32000,
     kept in bf16 by the compression, for reference): its per-shape default tiles and one change each
     (``GEMV_VARIANTS``) against the bf16 product of the same shape (``layers.linear``, the model's path) and
     XLA's dequantize + matmul. Each row times ``COPIES`` distinct weights (more bytes than the L2 cache holds)
     called back to back in one program; a time is the device kernels' time per call
     (``train.bench.device_seconds``, from a profiler trace: timed on the host, these rows read 3-5x the
     kernels' time in a decode profile). GB/s: bytes of packed words + scales + zeros (bf16: the weight) per
     call time; "vs bf16": bf16 time / this time; "err": max |y - y_ref| / max |y_ref| against x @
     dequantize() in float32 (a wrong kernel shows here). A variant that fails to compile or run is an
     error row.
  5. greedy decoding at batch 1 (prompt 512, --new_tokens) of the variants named in --decode ("bf16" (the
     six-kernel layer, ``model.decode="auto"``), "W8A8" (O1), "int4 g128" (XLA dequantizes into a bf16 copy before
     each matmul), "int4 g128 fused" (rows through ``int4_kernel.int4_gemv`` with its per-shape default tiles, or
     --gemv's), "int4 g128 layer" (the six-kernel layer on out-major int4 weights); every variant but "bf16" and
     "int4 g128 layer" runs op by op, ``model.decode="xla"``) and, in the same process, one
     more fused variant per --decode_ab tile setting (an A/B of the kernel's tiles); through
     ``models.generate``; decode step time = (time for N new tokens - time for 1) / (N - 1), prefill
     excluded. Weight bytes per step / step time is the effective bandwidth; the byte ratio bounds int4's
     speedup near 3.3x, less the step's work that is not weight traffic (attention, norms, launches). With
     --profile DIR each variant's 32 decode steps are traced and its device kernels tabulated per step
     (``train.bench.kernel_table``: busy time, launches, the costliest kernels; the fused kernels are named
     int4_gemv_KxN).
  6. ops (no device work: abstract shapes, runs on CPU in seconds): per variant, the operations of one
     batch-1 decode step of the 1.26B config (jaxpr equations, fused kernels included as one each), the
     fused kernels per step and each one's shape and tiling, and what ``decode_params`` does once before the
     loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from train import bench, cli  # noqa: E402

timed = functools.partial(bench.median_seconds, reps=20)


TINY = False  # --tiny: small sizes, a CPU check of the code paths
ATTENTION = ""  # --attention: model.attention of every variant (empty: the config's)


GEMV_OPTIONS: dict = {}  # --gemv: tile settings of the "int4 g128 fused" decode variant
DECODE_VARIANTS = ("bf16", "W8A8", "int4 g128", "int4 g128 fused", "int4 g128 layer")  # --decode's names
LAYER_VARIANTS = ("bf16", "int4 g128 layer")  # decoded with model.decode="auto" (the six-kernel layer); others "xla"
SECTIONS = ("memory", "linear", "gemv", "decode", "ops")  # --sections


def kernel_name() -> str:
    return "interpret" if TINY else "pallas"


def ceilings() -> dict:
    """bf16 matmul and int8 product rates (n^3 products, random inputs) and copy bandwidth, measured here."""
    n = 512 if TINY else 8192
    ai, bi = (jax.random.randint(jax.random.PRNGKey(k), (n, n), -127, 128, jnp.int32).astype(jnp.int8) for k in (2, 3))
    i8 = timed(jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.int32)), ai, bi, reps=10)
    return {"bf16_tflops": bench.matmul_ceiling(n) / 1e12, "int8_tops": 2 * n ** 3 / i8 / 1e12,
            "copy_gbs": bench.copy_bandwidth(2 ** -9 if TINY else 2.0) / 1e9}


def model_variants(names=("bf16", "W8A8", "int4 g128", "int4 g128 fused"), abstract: bool = False):
    """(model, cfg, {name: params}) for the 1.26B config: "bf16", "W8A8" (per-tensor weights, O1), "int4 g128"
    (XLA dequantize), "int4 g128 fused" (the fused kernel, --gemv tiles), "int4 fused OPTS" (those tiles) and
    "int4 g128 layer" (the int4 weights, which ``decode_params`` lays out for the six-kernel layer at batch 1);
    ``abstract``: shapes only (``jax.eval_shape``), no device memory."""
    from experiments import bench_llama_1b
    from models import awq, int4_kernel, smoothquant, transformer, weights

    c = bench_llama_1b.get_config()
    c.model.param_dtype = "bfloat16"
    if TINY:
        c.model.update(vocab_size=1000, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512)
    c.model.attention = ATTENTION or c.model.attention
    mcfg = transformer.from_config(c.model)
    params = (jax.eval_shape(lambda: transformer.init(mcfg, jax.random.PRNGKey(0))) if abstract else
              jax.jit(transformer.init, static_argnums=0)(mcfg, jax.random.PRNGKey(0)))
    axes = transformer.param_axes(mcfg)
    out = {}
    w4 = None
    for name in names:
        if name == "bf16":
            out[name] = params
        elif name == "W8A8":
            out[name] = smoothquant.quantize(params, axes, mcfg, act="per_token")[0]
        elif name.startswith("int4"):
            if w4 is None:
                def int4(path, w, names):
                    packed = jax.eval_shape(lambda a: awq.pack(a, 4, 128), w) if abstract else awq.pack(w, 4, 128)
                    return packed, awq.Int4(tuple(names), tuple(names), tuple(names), 4, 128)

                w4, _ = weights.wrap(params, axes, int4, smoothquant.is_block_linear)
            if name in ("int4 g128", "int4 g128 layer"):
                out[name] = w4
            elif name == "int4 g128 fused":
                out[name] = awq.with_kernel(w4, kernel_name(), **GEMV_OPTIONS)
            elif name.startswith("int4 fused "):
                out[name] = awq.with_kernel(w4, kernel_name(), **int4_kernel.kernel_options("x:" + name[11:])[1])
            else:
                raise ValueError(f"unknown variant {name!r}")
        else:
            raise ValueError(f"unknown variant {name!r}; use one of {', '.join(DECODE_VARIANTS)}.")
    return transformer, mcfg, out


def memory(variants: dict) -> list:
    from models import quant

    base = quant.memory_report(variants["bf16"])
    rows = []
    for name, p in variants.items():
        r = quant.memory_report(p)
        rows.append({"variant": name, **r, "linear_vs_bf16": r["linear_bytes"] / base["linear_bytes"],
                     "model_vs_bf16": r["model_bytes"] / base["model_bytes"]})
    return rows


def linears() -> list:
    from models import awq, smoothquant, weights

    rows = []
    for m in ((1, 64) if TINY else (1, 2048, 8192, 16384)):
        for k, n in (((256, 512),) if TINY else ((2048, 2048), (2048, 5632), (5632, 2048))):
            kx, kw = jax.random.split(jax.random.PRNGKey(m + k + n))
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k))
            q, sw = smoothquant.quantize_weight(w, per_channel=False, experts=False)
            o1 = smoothquant.W8A8(q, sw, jnp.zeros(()), "per_token")
            o3 = smoothquant.W8A8(q, sw, jnp.asarray(float(jnp.max(jnp.abs(x))) / 127, jnp.float32), "static")
            i4 = awq.pack(w, 4, 128)
            xq = jnp.clip(jnp.round(x.astype(jnp.float32) * 20), -127, 127).astype(jnp.int8)
            wb = w.astype(jnp.bfloat16)
            t = {
                "bf16": timed(jax.jit(jnp.dot), x, wb),
                "int8 product": timed(jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32)), xq, q),
                "W8A8 O1": timed(jax.jit(lambda wt, a: wt.matmul(a, weights.Dot())), o1, x),
                "W8A8 O3": timed(jax.jit(lambda wt, a: wt.matmul(a, weights.Dot())), o3, x),
                "int4 (dequantize + bf16)": timed(jax.jit(lambda wt, a: wt.matmul(a, weights.Dot())), i4, x),
            }
            rows.append({"tokens": m, "in": k, "out": n, **{f"{name} ms": 1e3 * v for name, v in t.items()},
                         **{f"{name} TFLOP/s": 2 * m * k * n / v / 1e12 for name, v in t.items()}})
            print(rows[-1], flush=True)
    return rows


GEMV_SHAPES = "2048x6144,2048x2048,2048x11264,5632x2048,2048x32000"  # decode_params' fused W_qkv, W_o, fused
# W_gate_up, W_down, and the head (kept in bf16 by the compression, for reference)
GEMV_VARIANTS = (  # (name, int4_gemv options): the per-shape default, then one requested change each (the
    # plan fits the rest to the shape: e.g. with splits=4 it may still halve block_n; the tiles column shows it)
    ("default", {}),
    ("block_n=512 warps=8", dict(block_n=512, num_warps=8)),
    ("block_n=256", dict(block_n=256)),
    ("block_n=128", dict(block_n=128)),
    ("convert=magic", dict(convert="magic")),
    ("combine=atomic", dict(combine="atomic")),
    ("splits=4", dict(splits=4)),
)
MANY_ROWS = ("default", "combine=atomic", "block_n=128", "splits=4")  # rows > 2


def gemv(rows_list=(1,), shapes=GEMV_SHAPES) -> list:
    """The fused int4 kernel's variants vs bf16 and XLA's dequantize + matmul at decoding sizes (table 4);
    shapes "KxN,KxN"."""
    from models import awq, int4_kernel, layers

    shapes = ((256, 512), (512, 256)) if TINY else [tuple(int(d) for d in kn.split("x")) for kn in shapes.split(",")]
    out = []
    for k, n in shapes:
        group = 128
        words = (k // 8) * n * 4 + 2 * 2 * (k // group) * n  # packed uint32 + float16 scale and zero
        copies = 2 if TINY else min(32, max(8, -(-(96 << 20) // words)))  # >= 70 MB: over the 50 MB L2 cache
        keys = jax.random.split(jax.random.PRNGKey(k + n), copies)
        packed = [jax.random.bits(kk, (k // 8, n), jnp.uint32) for kk in keys]
        scale = [jax.random.uniform(kk, (k // group, n), jnp.float16, 0.001, 0.01) for kk in keys]
        zero = [jnp.round(jax.random.uniform(kk, (k // group, n), jnp.float32, 0, 15)).astype(jnp.float16)
                for kk in jax.random.split(keys[0], copies)]
        dense = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in keys]
        for m in rows_list:
            xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(jax.random.PRNGKey(m), copies)]
            x = xs[0]
            ref = np.asarray(x.astype(jnp.float32) @ awq.Int4(packed[0], scale[0], zero[0], 4, group).dequantize())

            def per_call(f, *ws):  # a distinct x per copy: XLA's dot merger joins products that share an operand
                run = jax.jit(lambda a, *w: [f(a[i], *[c[i] for c in w]) for i in range(copies)])
                return bench.device_seconds(lambda: run(xs, *ws), reps=10) / copies

            base = {"rows": m, "in": k, "out": n, "copies": copies}
            t_bf16 = per_call(lambda a, w: layers.linear(w, a), dense)  # the model's path (one row: 2-row GEMM)
            out.append({**base, "variant": "bf16 (XLA)", "us": 1e6 * t_bf16, "GB/s": k * n * 2 / t_bf16 / 1e9,
                        "vs bf16": 1.0})
            t_xla = per_call(lambda a, p, s, z: a @ awq.Int4(p, s, z, 4, group).dequantize(a.dtype), packed, scale,
                             zero)
            out.append({**base, "variant": "int4 XLA dequantize", "us": 1e6 * t_xla, "GB/s": words / t_xla / 1e9,
                        "vs bf16": t_bf16 / t_xla})
            print(out[-2], out[-1], sep="\n", flush=True)
            for name, opts in GEMV_VARIANTS:
                if m > 2 and name not in MANY_ROWS:
                    continue
                plan = int4_kernel.gemv_plan(m, k, n, group, **opts)
                row = {**base, "variant": name, "tiles": "fallback" if plan is None else
                       "bn={block_n} bk={block_k} splits={splits} warps={num_warps} stages={num_stages} {mode} "
                       "{convert} {combine}".format(**plan)}
                try:
                    def f(a, p, s, z, opts=opts):
                        return int4_kernel.int4_gemv(a, p, s, z, group=group, interpret=TINY, **opts)

                    got = np.asarray(jax.jit(f)(x, packed[0], scale[0], zero[0]))
                    t = per_call(f, packed, scale, zero)
                    row.update({"us": 1e6 * t, "GB/s": words / t / 1e9, "vs bf16": t_bf16 / t,
                                "err": float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))})
                except Exception as e:  # a variant that does not compile or run here: an error row
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                out.append(row)
                print(row, flush=True)
    return out


def decode(model, mcfg, variants: dict, new_tokens: int, prompt_len: int = 512, reps: int = 3,
           profile: str = "") -> list:
    from models import generate, quant
    from train import bench as train_bench

    prompt_len = 16 if TINY else prompt_len
    prompts = np.random.default_rng(0).integers(3, mcfg.vocab_size, (1, prompt_len)).tolist()
    rows = []
    for name, p in variants.items():
        if "fused" in name and not ok_kernel(p):
            continue
        cfg = mcfg if name in LAYER_VARIANTS else dataclasses.replace(mcfg, decode="xla")

        def run(n, cfg=cfg):
            t = time.perf_counter()
            generate.greedy(model, p, cfg, prompts, max_new_tokens=n, max_len=prompt_len + new_tokens)
            return time.perf_counter() - t

        run(new_tokens)
        run(1)
        full = statistics.median(run(new_tokens) for _ in range(reps))
        prefill = statistics.median(run(1) for _ in range(reps))
        step = (full - prefill) / (new_tokens - 1)
        mem = quant.memory_report(p)
        step_bytes = mem["model_bytes"] - p["embed"].size * p["embed"].dtype.itemsize  # the table is gathered
        rows.append({"variant": name, "decode_step_ms": 1e3 * step, "decode_tokens_per_s": 1 / step,
                     "prefill_s": prefill, "weight_bytes_per_step": step_bytes, "GB/s": step_bytes / step / 1e9})
        print(rows[-1], flush=True)
        if profile:  # up to 32 steps traced (the same compiled loop): device kernels per step
            n = min(33, new_tokens)
            logdir = os.path.join(profile, name.replace(" ", "_").replace("=", "").replace(",", "_"))
            os.makedirs(logdir, exist_ok=True)
            with jax.profiler.trace(logdir):
                run(n)
            print(f"{name}: prefill + {n - 1} steps\n" + train_bench.kernel_table(logdir, n - 1), flush=True)
    base = next((r for r in rows if r["variant"] == "bf16"), rows[0])["decode_step_ms"]
    for r in rows:
        r["speedup_vs_bf16" if "bf16" in variants else "vs_first"] = base / r["decode_step_ms"]
    return rows


def ok_kernel(params) -> bool:
    """Whether the fused int4 kernel compiles and runs here with ``params``' tiles (printed reason when not)."""
    from models import int4_kernel

    w = params["layers"]["wq"]
    try:
        one = jax.tree.map(lambda a: a[0], w)
        name, opts = int4_kernel.kernel_options(one.kernel)
        x = jnp.ones((one.scale.shape[0] * one.group,), jnp.bfloat16)
        jax.block_until_ready(int4_kernel.int4_gemv(x, one.packed, one.scale, one.zero, group=one.group,
                                                    interpret=name == "interpret", **opts))
        return True
    except Exception as e:
        print(f"int4 fused kernel unavailable: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return False


def ops(names) -> list:
    """Operations of one batch-1 decode step of the 1.26B config per variant (table 6), from its jaxpr on
    abstract shapes: equations by primitive (a ``pallas_call`` counts once, its kernel not looked into), the
    fused kernels' shapes and tilings, and the operations ``decode_params`` runs once before the loop."""
    import collections

    import jax.extend.core as jex

    from models import int4_kernel

    model, mcfg, variants = model_variants(names, abstract=True)
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    cache = jax.eval_shape(lambda: model.init_cache(mcfg, 1, 768))

    def count(jaxpr, acc, kernels):
        for e in jaxpr.eqns:
            if e.primitive.name == "pallas_call":
                acc["pallas_call"] += 1
                name = e.params.get("name") or e.params.get("name_and_src_info")
                kernels.append((str(getattr(name, "name", name)), tuple(e.params["grid_mapping"].grid)))
                continue
            subs = list(jex.jaxprs_in_params(e.params))
            for sub in subs:
                count(sub, acc, kernels)
            if not subs or e.primitive.name not in ("pjit", "jit", "closed_call", "custom_jvp_call",
                                                    "custom_vjp_call"):
                acc[e.primitive.name] += 1

    rows = []
    for name, p in variants.items():
        dp = jax.eval_shape(lambda q: model.decode_params(q, mcfg), p)

        def step(dp, tok, cache):
            logits, aux = model.apply(dp, tok, mcfg, cache=cache)
            return logits, aux["cache"]

        acc, kernels = collections.Counter(), []
        count(jax.make_jaxpr(step)(dp, tok, cache).jaxpr, acc, kernels)
        once = collections.Counter()
        count(jax.make_jaxpr(lambda q: model.decode_params(q, mcfg))(p).jaxpr, once, [])
        tiles = []
        for (kname, grid), n in collections.Counter(kernels).items():
            k, n_out = (int(d) for d in kname.rsplit("_", 1)[1].split("x"))
            opts = int4_kernel.kernel_options(p["layers"]["wq"].kernel)[1]
            plan = int4_kernel.gemv_plan(1, k, n_out, 128, **opts)
            tiles.append(f"{n} x {k}x{n_out} grid {grid[0]}x{grid[1]} bn={plan['block_n']} bk={plan['block_k']} "
                         f"steps={plan['steps']} warps={plan['num_warps']} {plan['convert']} {plan['combine']}")
        rows.append({"variant": name, "ops_per_step": sum(acc.values()), "pallas_calls": acc["pallas_call"],
                     "dot_general": acc["dot_general"], "reduce_sum": acc["reduce_sum"],
                     "concatenate": acc["concatenate"], "convert": acc["convert_element_type"],
                     "kernels": "; ".join(tiles), "decode_params_once": dict(once),
                     "by_primitive": dict(acc.most_common())})
        print(rows[-1], flush=True)
    return rows


def md(rows: list, cols: list) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                     for c in cols) + " |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="")
    p.add_argument("--sections", default="memory,linear,gemv,decode",
                   help=f"comma-separated, some of {','.join(SECTIONS)}")
    p.add_argument("--gemv", default="", help="tile settings of the 'int4 g128 fused' variant, 'block_n=256,splits=8'"
                   " (default: the kernel's per-shape defaults)")
    p.add_argument("--gemv_rows", default="1", help="rows of x in the gemv table, '1,8'")
    p.add_argument("--gemv_shapes", default=GEMV_SHAPES, help="KxN shapes of the gemv table, '2048x6144,2048x2048'")
    p.add_argument("--decode", default="bf16,int4 g128 fused,int4 g128 layer",
                   help="decode variants: some of bf16, W8A8, 'int4 g128' (XLA dequantize), 'int4 g128 fused' "
                   "(int4_gemv op by op), 'int4 g128 layer' (the six-kernel layer)")
    p.add_argument("--decode_ab", default="block_n=512,num_warps=8",
                   help="';'-separated tile settings: one more fused decode variant each, in the same process")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--profile", default="", help="decode: trace 32 steps of each variant here, tabulate kernels")
    p.add_argument("--tiny", action="store_true", help="small sizes: a quick check of the code paths on CPU")
    p.add_argument("--attention", default="", help="model.attention of every variant, e.g. pallas_decode (the fused "
                   "decode-attention kernel for cached steps); empty: the config's")
    args = p.parse_args()
    global TINY, GEMV_OPTIONS, ATTENTION
    TINY, ATTENTION = args.tiny, args.attention
    from models import int4_kernel
    for flag, spec in [("--gemv", args.gemv)] + [("--decode_ab", o.strip()) for o in args.decode_ab.split(";")]:
        try:  # option names and values, checked before anything compiles
            opts = int4_kernel.kernel_options("pallas:" + spec)[1]
            int4_kernel.gemv_plan(1, 2048, 2048, 128, **opts)
        except ValueError as e:
            p.error(f"{flag} {spec!r}: {e}")
        if flag == "--gemv":
            GEMV_OPTIONS = opts
    try:
        cli.out_file(args.out)
    except ValueError as e:
        p.error(str(e))
    sections = set(args.sections.split(","))
    if unknown := sorted(sections - set(SECTIONS)):
        p.error(f"--sections {args.sections!r} names {unknown}; choose from {','.join(SECTIONS)}.")
    decode_names = [n.strip() for n in args.decode.split(",") if n.strip()]
    if unknown := [n for n in decode_names if n not in DECODE_VARIANTS]:
        p.error(f"--decode {args.decode!r} names {unknown}; choose from {', '.join(DECODE_VARIANTS)}.")
    decode_names += [f"int4 fused {o.strip()}" for o in args.decode_ab.split(";") if o.strip()]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = {}
    if sections - {"ops"}:
        results["ceilings"] = ceilings()
        print(md([results["ceilings"]], list(results["ceilings"])), flush=True)
    if "ops" in sections:
        results["ops"] = ops(["bf16", "int4 g128"] + [n for n in decode_names if "fused" in n])
        print(md(results["ops"], ["variant", "ops_per_step", "pallas_calls", "dot_general", "reduce_sum",
                                  "concatenate", "convert", "kernels"]), flush=True)
    if sections & {"memory", "decode"}:
        names = ["bf16", "W8A8", "int4 g128"] if "memory" in sections else []
        names += [n for n in decode_names if n not in names] if "decode" in sections else []
        model, mcfg, variants = model_variants(names)
        if "memory" in sections:
            results["memory"] = memory({n: variants[n] for n in ("bf16", "W8A8", "int4 g128")})
            print(md(results["memory"], ["variant", "linear_bytes", "bytes_per_linear_param", "linear_vs_bf16",
                                         "model_bytes", "model_vs_bf16"]), flush=True)
    if "linear" in sections:
        results["linear"] = linears()
        cols = ["tokens", "in", "out"] + [c for c in results["linear"][0] if c.endswith("ms")]
        print(md(results["linear"], cols), flush=True)
    if "gemv" in sections:
        results["gemv"] = gemv(tuple(int(r) for r in args.gemv_rows.split(",")), args.gemv_shapes)
        print(md(results["gemv"], ["rows", "in", "out", "variant", "us", "GB/s", "vs bf16", "err", "tiles", "error"]),
              flush=True)
    if "decode" in sections:
        results["decode"] = decode(model, mcfg, {n: variants[n] for n in decode_names}, args.new_tokens,
                                   profile=args.profile)
        print(md(results["decode"], ["variant", "decode_step_ms", "decode_tokens_per_s", "GB/s", "speedup_vs_bf16",
                                     "vs_first", "prefill_s"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
