"""Speed and memory of the quantized weight types on one GPU, for the 1.26B config (experiments/bench_llama_1b.py).

    python experiments/bench_quant.py [--out results.json] [--sections memory,linear,decode] [--new_tokens 256]

Prints four Markdown tables:
  1. ceilings measured in the same job: bf16 matmul TFLOP/s, int8 TOP/s (8192^3), copy GB/s;
  2. memory: bytes of the block linears and of the whole model for bfloat16, W8A8 (int8 + float32 scales)
     and int4 (group 128, float16 scales and zeros: 0.5 + 4/128 bytes per parameter, 0.27x bf16);
  3. one linear at prefill sizes (tokens x in -> out): bf16 ``jnp.dot``, the int8 x int8 -> int32 product
     alone, W8A8 O1 (per-token dynamic activation quantization + the int8 product + rescale), W8A8 O3
     (static scale), int4 weight-only (dequantize, then bf16 matmul);
  4. greedy decoding at batch 1 (prompt 512, --new_tokens): bf16 weights, W8A8 O1 and int4 weights through
     ``models.generate``; decode step time = (time for N new tokens - time for 1) / (N - 1), prefill excluded.
     Weight bytes per step / step time is the effective bandwidth. "int4 g128" lets XLA dequantize into a
     bf16 copy before the matmul (not expected to beat bf16); "int4 g128 fused" runs single rows through
     the Pallas kernel ``awq.int4_gemv`` (reads the packed bytes once); the byte ratio bounds its speedup
     near 3.3x. Table 3 also has a batch-1 row (tokens = 1) with the fused kernel alone.
"""
from __future__ import annotations

import argparse
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

from train import bench  # noqa: E402

timed = functools.partial(bench.median_seconds, reps=20)


TINY = False  # --tiny: small sizes, a CPU check of the code paths


def kernel_name() -> str:
    return "interpret" if TINY else "pallas"


def ceilings() -> dict:
    """bf16 matmul and int8 product rates (n^3 products, random inputs) and copy bandwidth, measured here."""
    n = 512 if TINY else 8192
    ai, bi = (jax.random.randint(jax.random.PRNGKey(k), (n, n), -127, 128, jnp.int32).astype(jnp.int8) for k in (2, 3))
    i8 = timed(jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.int32)), ai, bi, reps=10)
    return {"bf16_tflops": bench.matmul_ceiling(n) / 1e12, "int8_tops": 2 * n ** 3 / i8 / 1e12,
            "copy_gbs": bench.copy_bandwidth(2 ** -9 if TINY else 2.0) / 1e9}


def model_variants():
    """(model, cfg, {name: params}) for the 1.26B config: bf16, W8A8 (per-tensor weights, O1), int4 g128."""
    from experiments import bench_llama_1b
    from models import awq, smoothquant, transformer, weights

    c = bench_llama_1b.get_config()
    c.model.param_dtype = "bfloat16"
    if TINY:
        c.model.update(vocab_size=1000, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512)
    mcfg = transformer.from_config(c.model)
    params = jax.jit(transformer.init, static_argnums=0)(mcfg, jax.random.PRNGKey(0))
    axes = transformer.param_axes(mcfg)
    w8, _ = smoothquant.quantize(params, axes, mcfg, act="per_token")

    def int4(path, w, names):
        return awq.pack(w, 4, 128), awq.Int4(tuple(names), tuple(names), tuple(names), 4, 128)

    w4, _ = weights.wrap(params, axes, int4, smoothquant.is_block_linear)
    return transformer, mcfg, {"bf16": params, "W8A8": w8, "int4 g128": w4,
                               "int4 g128 fused": awq.with_kernel(w4, kernel_name())}


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
            if m == 1:  # the fused batch-1 kernel (awq.int4_gemv)
                try:
                    t["int4 fused"] = timed(jax.jit(lambda wt, a: wt.matmul(a, weights.Dot())),
                                            awq.with_kernel(i4, kernel_name()), x)
                except Exception as e:  # a kernel that does not compile here: say so, keep the other numbers
                    print(f"int4 fused kernel failed at {k}x{n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    t["int4 fused"] = float("nan")
            rows.append({"tokens": m, "in": k, "out": n, **{f"{name} ms": 1e3 * v for name, v in t.items()},
                         **{f"{name} TFLOP/s": 2 * m * k * n / v / 1e12 for name, v in t.items()}})
            print(rows[-1], flush=True)
    return rows


def decode(model, mcfg, variants: dict, new_tokens: int, prompt_len: int = 512, reps: int = 3) -> list:
    from models import generate, quant

    prompt_len = 16 if TINY else prompt_len
    prompts = np.random.default_rng(0).integers(3, mcfg.vocab_size, (1, prompt_len)).tolist()
    rows = []
    for name, p in variants.items():
        if name == "int4 g128 fused" and not ok_kernel(p):
            continue

        def run(n):
            t = time.perf_counter()
            generate.greedy(model, p, mcfg, prompts, max_new_tokens=n, max_len=prompt_len + new_tokens)
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
    base = rows[0]["decode_step_ms"]
    for r in rows:
        r["speedup_vs_bf16"] = base / r["decode_step_ms"]
    return rows


def ok_kernel(params) -> bool:
    """Whether the fused int4 kernel compiles and runs here (printed reason when not)."""
    from models import awq

    w = params["layers"]["wq"]
    try:
        one = jax.tree.map(lambda a: a[0], w)
        jax.block_until_ready(awq.int4_gemv(jnp.ones((one.packed.shape[0] * 2,), jnp.bfloat16), one.packed,
                                            one.scale, one.zero, group=one.group, interpret=TINY))
        return True
    except Exception as e:
        print(f"int4 fused kernel unavailable: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return False


def md(rows: list, cols: list) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                     for c in cols) + " |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="")
    p.add_argument("--sections", default="memory,linear,decode")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--tiny", action="store_true", help="small sizes: a quick check of the code paths on CPU")
    args = p.parse_args()
    global TINY
    TINY = args.tiny
    sections = set(args.sections.split(","))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = {"ceilings": ceilings()}
    print(md([results["ceilings"]], list(results["ceilings"])), flush=True)
    if sections & {"memory", "decode"}:
        model, mcfg, variants = model_variants()
        if "memory" in sections:
            results["memory"] = memory(variants)
            print(md(results["memory"], ["variant", "linear_bytes", "bytes_per_linear_param", "linear_vs_bf16",
                                         "model_bytes", "model_vs_bf16"]), flush=True)
    if "linear" in sections:
        results["linear"] = linears()
        cols = ["tokens", "in", "out"] + [c for c in results["linear"][0] if c.endswith("ms")]
        print(md(results["linear"], cols), flush=True)
    if "decode" in sections:
        results["decode"] = decode(model, mcfg, variants, args.new_tokens)
        print(md(results["decode"], ["variant", "decode_step_ms", "decode_tokens_per_s", "GB/s", "speedup_vs_bf16",
                                     "prefill_s"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
