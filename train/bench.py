"""Training-speed benchmark: N steps of a config's real train step on synthetic batches.

    python -m train.bench --config experiments/bench_llama_1b.py [--steps 20] [--warmup 3] [--out FILE.json]

Each row is one config variant (``--variants 'name:key=value,key=value;...'`` overrides config
fields per row). Per variant: compile time, median step time over the timed steps, tokens/s,
MFU against the datasheet peak and against a bf16 matmul ceiling measured in the same process,
and peak device memory. Batches are random tokens, one causal sequence per row (no packing).
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from parallel import mesh as mesh_lib
from parallel import sharding
from train import metrics
from train.setup import setup_training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_VARIANTS = flags.DEFINE_string("variants", "", "'name:section.key=value,...;name2:...' (empty: the config alone).")
_OUT = flags.DEFINE_string("out", "", "Write the table as JSON here.")


def matmul_ceiling(n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul FLOP/s on device 0 (median of ``reps`` n^3 products, random inputs)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(value, value)


def apply_overrides(config, spec: str):
    config = config.copy_and_resolve_references()
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        config[section][field] = _parse(value)
    return config


def bench(config, steps: int, warmup: int) -> dict:
    """Time ``steps`` train steps of ``config``; returns the row of the table."""
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh))
    t, mcfg, mesh, rules = config.train, setup.mcfg, setup.mesh, setup.rules
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mcfg.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32)
    batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                   "loss_mask": np.ones((t.batch_size, t.seq_len), np.int32)}, mesh, rules)
    with sharding.activate(mesh, rules):
        state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.PRNGKey(0))
        t0 = time.perf_counter()
        compiled = setup.jit_train_step().lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_per_s = t.batch_size * t.seq_len / step_s
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "step_s": step_s,
        "step_s_spread": [min(times), max(times)],
        "tokens_per_s": tokens_per_s,
        "flops_per_token": setup.model.flops_per_token(mcfg, t.seq_len),
        "compile_s": compile_s,
        "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
        "loss": float(m["loss"]),
    }


def main(argv):
    del argv
    base = _CONFIG.value
    variants = [v.split(":", 1) for v in _VARIANTS.value.split(";") if v] or [["config", ""]]
    ceiling = matmul_ceiling()
    peak = metrics.peak_flops(jax.devices()[0])
    rows = {}
    for name, spec in variants:
        row = bench(apply_overrides(base, spec), _STEPS.value, _WARMUP.value)
        n = jax.device_count()
        row["mfu_datasheet"] = row["flops_per_token"] * row["tokens_per_s"] / (peak * n) if peak else None
        row["mfu_measured_ceiling"] = row["flops_per_token"] * row["tokens_per_s"] / (ceiling * n)
        rows[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
    print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s (8192^3), datasheet {peak and peak / 1e12} TFLOP/s")
    print(f"{'variant':<24}{'step s':>9}{'tokens/s':>11}{'MFU(sheet)':>12}{'MFU(meas)':>11}{'mem GB':>8}{'compile s':>11}")
    for name, r in rows.items():
        sheet = f"{r['mfu_datasheet']:.3f}" if r["mfu_datasheet"] is not None else "-"
        print(f"{name:<24}{r['step_s']:>9.4f}{r['tokens_per_s']:>11.0f}{sheet:>12}{r['mfu_measured_ceiling']:>11.3f}"
              f"{r['peak_mem_gb']:>8.1f}{r['compile_s']:>11.1f}")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "ceiling_flops": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
