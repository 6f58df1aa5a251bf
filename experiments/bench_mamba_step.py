"""Time Mamba's one-token state update for all layers of the 370M-class model on one GPU: XLA against the fused
Pallas kernel (``models/step_kernel.py``) at a few block sizes.

    python -m experiments.bench_mamba_step                # b64, 48 layers, E2048 N16 R64 (bench_mamba_370m)
    python -m experiments.bench_mamba_step --quick        # tiny shape, CPU (interpreted kernel), seconds
    python -m experiments.bench_mamba_step --state_dtype bfloat16   # the state kept in bf16 (model.state_dtype)

One call runs the update of every layer in order on the stacked state h [48, b, E, N] float32 or
``--state_dtype`` (donated, so each layer's slot is replaced in place), from x, z [b, E], x_proj's output
[b, R + 2N] and each layer's dt_proj [R, E] (bf16): 'xla' is the decoding path's XLA step (dt_proj matmul, softplus,
``step_kernel.step_reference``, the new state written into its slot); 'pallas bB eE wW' the kernel with
B rows and E channels per program and W warps. Per layer: microseconds of device kernels
(``train.bench.device_seconds``: from a profiler trace, so host dispatch is not counted), and bytes (h read
and written once, the inputs read once) per second against an elementwise copy measured in the same
process (``train.bench.copy_bandwidth``). The state is 8 MB per layer at b64 (16 MB of traffic), so at
the copy's 3.2 TB/s a layer takes about 5 us. Each kernel row also gives its largest difference from
'xla' (relative to the largest |y| and |h|).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from models import step_kernel as K
from train import bench

F32, BF16 = jnp.float32, jnp.bfloat16


def inputs(L, b, E, N, R, seed=0):
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    n = lambda shape, dtype=BF16, s=1.0: (s * jax.random.normal(next(ks), shape, F32)).astype(dtype)  # noqa: E731
    h = n((L, b, E, N), F32)
    layer_w = dict(dt_proj=n((L, R, E), s=R ** -0.5), dt_bias=jnp.full((L, E), -4.0, F32),
                   A=-jnp.broadcast_to(jnp.arange(1, N + 1, dtype=F32), (L, E, N)), D=jnp.ones((L, E), F32))
    per_layer = [{k: v[i] for k, v in layer_w.items()} for i in range(L)]
    return h, dict(x=n((b, E)), z=n((b, E)), dbc=n((b, R + 2 * N))), per_layer


def xla_layer(h_all, i, x, z, dbc, w):
    R, N = w["dt_proj"].shape[0], w["A"].shape[-1]
    dt_raw = jnp.dot(dbc[:, :R], w["dt_proj"], preferred_element_type=F32)
    dt = jax.nn.softplus(dt_raw + w["dt_bias"])
    B, C = dbc[:, R:R + N].astype(F32), dbc[:, R + N:].astype(F32)
    h = jnp.exp(dt[..., None] * w["A"]) * h_all[i].astype(F32) + (dt * x.astype(F32))[..., None] * B[:, None, :]
    y = jnp.einsum("ben,bn->be", h, C) + w["D"] * x.astype(F32)
    return (y * jax.nn.silu(z.astype(F32))).astype(x.dtype), h_all.at[i].set(h.astype(h_all.dtype))


def all_layers(step):
    def run(h_all, acts, per_layer):
        ys = []
        for i, w in enumerate(per_layer):
            y, h_all = step(h_all, i, acts["x"], acts["z"], acts["dbc"], w)
            ys.append(y)
        return jnp.stack(ys), h_all
    return jax.jit(run, donate_argnums=0)


def kernel_layer(block_b, block_e, warps, interpret):
    def step(h_all, i, x, z, dbc, w):
        return K.selective_step(h_all, i, x, z, dbc, w["dt_proj"], w["dt_bias"], w["A"], w["D"], block_b=block_b,
                                block_e=block_e, num_warps=warps, interpret=interpret)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shape on CPU, interpreted kernel")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--state_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--configs", default="1x64x2,4x32x4,4x64x4,8x32x4,2x64x4,4x128x8,1x128x4",
                    help="kernel settings: block_b x block_e x warps, comma-separated")
    args = ap.parse_args()
    L, b, E, N, R = (2, 4, 64, 16, 16) if args.quick else (48, 64, 2048, 16, 64)
    interpret = args.quick or jax.default_backend() != "gpu"
    copy = bench.copy_bandwidth(0.0625 if args.quick else 2.0)
    h0, acts, per_layer = inputs(L, b, E, N, R)
    h0 = h0.astype(args.state_dtype)
    nbytes = L * (2 * h0[0].nbytes + sum(a.nbytes for a in acts.values()) + b * E * 2
                  + sum(v.nbytes for v in per_layer[0].values()))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; copy {copy / 1e12:.2f} TB/s; "
          f"b{b} layers {L} E{E} N{N} R{R}: {nbytes / L / 1e6:.1f} MB per layer (h read + written once)")
    print(f"{'variant':<18}{'us/layer':>10}{'TB/s':>8}{'of copy':>9}{'max diff y':>12}{'max diff h':>12}")
    want = None
    rows = [("xla", xla_layer)] + [(f"pallas b{c}", kernel_layer(*map(int, c.split("x")), interpret))
                                   for c in args.configs.split(",")]
    for name, step in rows:
        f = all_layers(step)
        try:
            h = jnp.array(h0)
            y, h = f(h, acts, per_layer)
            jax.block_until_ready(h)
            if want is None:
                want = (np.asarray(y, np.float32), np.asarray(h))
                diffs = "", ""
            else:
                diffs = tuple(f"{np.abs(np.asarray(g, np.float32) - w).max() / np.abs(w).max():.1e}"
                              for g, w in zip((y, h), want))
            state = [jnp.array(h0)]

            def call():  # the state is donated: each call takes the last one's
                state[0] = f(state[0], acts, per_layer)[1]
                return state[0]

            s = bench.device_seconds(call, reps=args.runs)
        except Exception as e:  # a block setting Triton refuses leaves the other rows
            print(f"{name:<18}failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        print(f"{name:<18}{1e6 * s / L:>10.1f}{nbytes / s / 1e12:>8.2f}{nbytes / s / copy:>9.2f}{diffs[0]:>12}"
              f"{diffs[1]:>12}")


if __name__ == "__main__":
    main()
