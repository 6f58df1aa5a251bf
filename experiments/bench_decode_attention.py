"""The cached decoding step's attention alone, at the 1.26B config's shapes: XLA against the fused Pallas kernel.

    python experiments/bench_decode_attention.py [--batches 1,64] [--q_start 640] [--max_len 768]
        [--configs 'block_k=64;block_k=32;block_k=128,num_warps=8'] [--reps 20] [--tiny]

One jitted program runs the attention of all 22 layers of one decode step (one new token per row, 16
heads = 16 kv heads of 128, bf16, the stacked cache [22, batch, max_len, 16, 128] read by layer as
``transformer.decoder_layer`` does, q_start = the cache index, every slot up to it in segment 1): with
``model.attention='xla'`` (the layer sliced out of the stacked cache, XLA's kernels) and with the kernel
that ``'pallas_decode'`` runs (``decode_attention.decode_attention``, called directly) for each --configs
entry (``decode_attention.Config`` fields; splits=0 is the automatic split-K). Prints per variant and
batch: the program's device time (``train.bench.device_seconds``: its kernels in a profiler trace, host
dispatch not counted) divided by the layers (us per layer), the bytes the attention must read (the
q_start + 1 filled slots of k and v, bf16) per second, the split count, and the largest absolute
difference from XLA's output. The mean cache index of ``train.bench``'s decoding (512-token prompt, 256
new tokens) is 640, its cache 768 slots.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import attention as A  # noqa: E402
from models import decode_attention as DA  # noqa: E402
from train import cli  # noqa: E402
from train.bench import device_seconds  # noqa: E402


def parse_config(spec: str) -> DA.Config:
    """'block_k=32,num_warps=8' -> decode_attention.Config (an empty spec: the defaults)."""
    fields = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in DA.Config._fields:
            raise ValueError(f"--configs: {key!r} is not a decode_attention.Config field; use {DA.Config._fields}.")
        fields[key] = int(value)
    return DA.Config(**fields)


def step_program(layers: int, config: DA.Config | None):
    """All layers' attention of one step: q [layers, b, 1, h, d] against the stacked cache -> [layers, b, 1, h, d];
    XLA's (``attention="xla"``, the layer sliced out) when ``config`` is None, else the kernel with ``config``."""
    def run(q, k, v, q_start, q_seg, kv_seg):
        outs = []
        for layer in range(layers):
            if config is None:
                outs.append(A.attention(q[layer], k, v, implementation="xla", q_segment_ids=q_seg,
                                        kv_segment_ids=kv_seg, q_start=q_start, kv_layer=layer))
            else:
                outs.append(DA.decode_attention(q[layer], k, v, q_start, q_seg, kv_seg, layer=layer, config=config))
        return jnp.stack(outs)

    return jax.jit(run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,64")
    p.add_argument("--q_start", type=int, default=640)
    p.add_argument("--max_len", type=int, default=768)
    p.add_argument("--configs", default="block_k=64;block_k=32;block_k=128;block_k=64,num_warps=8;block_k=64,splits=16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="small sizes: a quick check of the code paths on CPU")
    args = p.parse_args(argv)
    try:
        batches = cli.int_list(args.batches, "--batches")
    except ValueError as e:
        p.error(str(e))
    layers, kvh, d = (2, 4, 16) if args.tiny else (22, 16, 128)
    max_len = 40 if args.tiny else args.max_len
    q_start = min(args.q_start, max_len - 1)
    configs = [(spec.strip(), parse_config(spec)) for spec in args.configs.split(";")]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {layers} layers, {kvh} heads of {d}, "
          f"cache {max_len} slots, q_start {q_start}, bf16")
    print(f"{'variant':<34}{'batch':>6}{'splits':>7}{'us/layer':>10}{'GB/s':>8}{'max |diff|':>12}")
    for b in batches:
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((layers, b, 1, kvh, d)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((layers, b, max_len, kvh, d)), jnp.bfloat16) for _ in range(2))
        q_seg = jnp.ones((b, 1), jnp.int32)
        kv_seg = jnp.asarray(np.arange(max_len)[None, :].repeat(b, 0) <= q_start, jnp.int32)
        inputs = (q, k, v, jnp.int32(q_start), q_seg, kv_seg)
        read = 2 * b * (q_start + 1) * kvh * d * 2  # the filled slots of k and v, bf16
        want = None
        for name, config in [("xla", None)] + [(f"pallas {spec or 'default'}", c) for spec, c in configs]:
            try:
                f = step_program(layers, config)
                out = f(*inputs)
                s = device_seconds(lambda: f(*inputs), reps=args.reps) / layers
            except Exception as e:  # one failing variant (a tile Triton refuses) leaves the others' rows
                print(f"{name:<34}{b:>6}  error: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            want = out if want is None else want
            diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
            splits = "" if config is None else str(config.splits or DA.auto_splits(b, kvh, max_len, config))
            print(f"{name:<34}{b:>6}{splits:>7}{1e6 * s:>10.1f}{read / s / 1e9:>8.0f}{diff:>12.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
