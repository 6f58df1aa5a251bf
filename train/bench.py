"""Speed benchmarks: N steps of a config's real train step on synthetic batches, or greedy decoding.

    python -m train.bench --config experiments/bench_llama_1b.py [--steps 20] [--warmup 3] [--out FILE.json]
    python -m train.bench --config experiments/bench_llama_1b.py --decode_batches=1,64 [--prompt_len 512 --new_tokens 256]

Each row is one config variant (``--variants 'name:key=value,key=value;...'`` overrides config
fields per row). Per variant: compile time, median step time over the timed steps, tokens/s,
MFU against the datasheet peak and against a bf16 matmul ceiling measured in the same process,
device memory, and batches of random tokens, one causal sequence per row (no packing). Memory is
twofold: ``peak_mem_gb`` (``mem GB``), GPU 0's peak in use since the process started, so a variant
after another in one process reports the larger of the two (one process per variant for its own);
``planned_mem_gb`` (``plan GB``), the compiled step's bytes live per device by XLA's memory
analysis (``aot.live_bytes``), the variant's own wherever it runs.

With ``--split`` (the default) two more programs are compiled and timed the same way on the same
batch and state, to split the step: ``fwd_bwd_s``, the objective the train step differentiates
(``step.make_grad_fn``) and its gradients, returned so that the backward pass is kept; and
``optimizer_s``, the update of the state from gradients (``step.apply_gradients``), the state
donated as in the step. Their sum differs from ``step_s`` by
what fuses across the boundary and by the step's own small work (scaling by the token count,
the gradient norm). ``--nosplit`` skips them (two fewer compilations).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from models import COMPILER_OPTIONS, generate
from parallel import mesh as mesh_lib
from parallel import sharding
from train import aot, cli
from train import config as config_lib
from train import metrics
from train import optim, step as step_lib
from train.setup import setup_training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_VARIANTS = flags.DEFINE_string("variants", "", "'name:section.key=value,...;name2:...' (empty: the config alone).")
_OUT = flags.DEFINE_string("out", "", "Write the table as JSON here.")
_SPLIT = flags.DEFINE_bool("split", True, "Also time the gradients alone and the optimizer update alone.")
_DECODE = flags.DEFINE_list("decode_batches", [], "Benchmark greedy decoding at these batch sizes instead.")
_PROMPT = flags.DEFINE_integer("prompt_len", 512, "Decoding: prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Decoding: new tokens per row.")
_TRACE = flags.DEFINE_string("trace", "", "Training: also trace 3 steps of each variant into this directory, "
                             "report GPU 0's collective kernels' time per step, share of the step and exposed time "
                             "(no other kernel beside them), and print GPU 0's kernels per step.")
_PROFILE = flags.DEFINE_string("decode_profile", "", "Decoding: also trace 32 steps at the first batch size "
                               "into this directory and print the device kernels per step.")


def wall_seconds(f, *args, reps: int = 10) -> list[float]:
    """Wall seconds of ``reps`` calls of ``f(*args)`` (each blocked on its result) after one warm-up call."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return times


def median_seconds(f, *args, reps: int = 10) -> float:
    """Median wall seconds of ``f(*args)`` (blocked on its result) over ``reps`` calls after one warm-up call."""
    return statistics.median(wall_seconds(f, *args, reps=reps))


def device_seconds(call, reps: int = 5) -> float:
    """Seconds of GPU kernels per ``call()`` (blocked on its result): the durations of GPU 0's kernels in a
    profiler trace of ``reps`` calls after one untraced warm-up, summed, over reps. Host dispatch and the
    gaps between launches are not counted, so a kernel that takes microseconds is not buried in the host's
    noise. While it profiles, XLA launches each kernel on its own instead of through its command buffers (CUDA
    graphs), so the kernels are those of the unprofiled program but the gaps between them are not: compare a
    program's wall time for what a step costs. Off a GPU (or with no GPU kernels in the trace), the median wall
    time of ``reps`` calls instead."""
    if jax.default_backend() != "gpu":
        return median_seconds(call, reps=reps)
    jax.block_until_ready(call())
    logdir = tempfile.mkdtemp(prefix="device_seconds_")
    try:
        with jax.profiler.trace(logdir):
            for _ in range(reps):
                jax.block_until_ready(call())
        events = kernel_events(logdir)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    if events:
        return sum(duration for _, _, duration in events) / 1e9 / reps
    return median_seconds(call, reps=reps)


def matmul_ceiling(n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul FLOP/s on device 0 (median of ``reps`` n^3 products, random inputs)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    return 2 * n**3 / median_seconds(jax.jit(jnp.dot), a, b, reps=reps)


def apply_overrides(config, spec: str):
    """``config`` with a variant's 'section.key=value,...' overrides (``train.config.override``)."""
    return config_lib.override(config, filter(None, spec.split(",")))


def parse_variants(text: str, config) -> list[tuple[str, str]]:
    """``--variants`` 'name:key=value,...;name2:...' as [(name, overrides)] ([("config", "")] when empty).
    ValueError naming the variant for a missing name, a repeated one or overrides ``config`` refuses, so a
    typo in the last variant fails before the first one runs."""
    variants = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, spec = part.partition(":")
        if not sep or not name:
            raise ValueError(f"--variants entry {part!r} is not NAME:section.key=value,...; write e.g. "
                             f"'base:;long:train.seq_len=4096' (overrides may be empty after the colon).")
        if name in dict(variants):
            raise ValueError(f"--variants names {name!r} twice; give each variant its own name.")
        try:
            apply_overrides(config, spec)
        except (ValueError, TypeError) as e:  # a malformed or unknown field; a value of the wrong type
            raise ValueError(f"--variants {name!r}: {e}") from e
        variants.append((name, spec))
    return variants or [("config", "")]


def _timed(run, carry, steps: int, warmup: int):
    """``carry, out = run(carry)`` warmup + steps times, blocking on ``out`` after each timed call.

    Returns (carry, out, the seconds of each timed call)."""
    out = None
    for _ in range(warmup):
        carry, out = run(carry)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        carry, out = run(carry)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return carry, out, times


def split_programs(setup):
    """The two halves of the train step, jitted with the state's shardings: (fwd_bwd, optimizer).

    fwd_bwd(params, batch, rng) -> (objective, grads): the value the train step differentiates
    (the objective's summed loss, train mode; ``step.make_grad_fn``) and its gradients over the
    trainable parameters, sharded like them; the whole batch in one piece (the step's case when
    optim.accum_steps is 1). optimizer(state, grads) -> state: ``step.apply_gradients``, as the step
    does after its gradients; the state donated.
    """
    tx, frozen, params_sh = setup.tx, setup.frozen, setup.state_shardings.params
    grad_fn = step_lib.make_grad_fn(setup.model, setup.mcfg, setup.objective, frozen)
    grads_sh = params_sh if frozen is None else optim.trainable(params_sh, frozen)

    def fwd_bwd(params, batch, rng):
        out, grads = grad_fn(params, batch, rng)
        return out.total, grads

    def optimizer(state, grads):
        return step_lib.apply_gradients(tx, state, grads, frozen)

    options = COMPILER_OPTIONS  # compiled as the train step is
    return (jax.jit(fwd_bwd, in_shardings=(params_sh, setup.batch_sharding, None),
                    out_shardings=(None, grads_sh), compiler_options=options),
            jax.jit(optimizer, in_shardings=(setup.state_shardings, grads_sh),
                    out_shardings=setup.state_shardings, donate_argnums=(0,), compiler_options=options))


def _bench_split(setup, state, batch, steps: int, warmup: int) -> dict:
    """Compile and time ``split_programs`` from ``state`` (donated) on ``batch``: fwd_bwd_s, optimizer_s, ..."""
    config, t = setup.config, setup.config.train
    fwd_bwd, optimizer = split_programs(setup)
    whole = config.optim.accum_steps == 1
    key = step_lib.step_rng(config.seed, 0)  # the first step's key
    t0 = time.perf_counter()
    fwd_bwd = fwd_bwd.lower(state.params, batch, key).compile() if whole else None
    view = state.params if setup.frozen is None else optim.trainable(state.params, setup.frozen)
    optimizer = optimizer.lower(state, view).compile()
    row = {"split_compile_s": time.perf_counter() - t0, "fwd_bwd_s": None, "fwd_bwd_s_spread": None}
    if whole:
        _, (_, grads), times = _timed(lambda c: (c, fwd_bwd(state.params, batch, key)), None, steps, warmup)
        row.update(fwd_bwd_s=statistics.median(times), fwd_bwd_s_spread=[min(times), max(times)])
        grads = jax.tree.map(lambda g: g / (t.batch_size * t.seq_len), grads)  # the step's mean over tokens
    else:
        grads = jax.tree.map(lambda p: p * 1e-3, view)  # any gradients of the right shapes
    _, _, times = _timed(lambda s: (optimizer(s, grads),) * 2, state, steps, warmup)
    row.update(optimizer_s=statistics.median(times), optimizer_s_spread=[min(times), max(times)])
    return row


def random_batch(setup, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens for each row set the objective reads (``inputs``, ``targets`` = inputs shifted by one,
    ``loss_mask`` all ones; one causal sequence per row, no segment ids or positions), [batch, seq]."""
    t, rng = setup.config.train, np.random.default_rng(seed)
    batch = {}
    for prefix in sorted({k[:-len("inputs")] for k in setup.objective.batch_keys if k.endswith("inputs")}):
        tokens = rng.integers(0, setup.mcfg.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32)
        batch.update({prefix + "inputs": tokens[:, :-1], prefix + "targets": tokens[:, 1:],
                      prefix + "loss_mask": np.ones((t.batch_size, t.seq_len), np.int32)})
    return batch


def collective_share(compiled, state, batch, logdir: str, steps: int = 3) -> dict:
    """Trace ``steps`` calls of the compiled train step; GPU 0's collective kernels (NCCL's: all-to-all,
    all-reduce, all-gather, reduce-scatter, send/receive) per step: seconds, share of its wall time, and the
    seconds no other kernel overlaps (``exposed_ns``)."""
    os.makedirs(logdir, exist_ok=True)
    with jax.profiler.trace(logdir):
        for _ in range(steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
    events = kernel_events(logdir)
    by_name, wall = tabulate(events)
    is_comm = lambda name: "nccl" in name.lower()  # noqa: E731
    comm = sum(t for name, (t, _) in by_name.items() if is_comm(name))
    return {"collective_s": comm / steps / 1e9, "collective_share": comm / wall if wall else None,
            "collective_exposed_s": exposed_ns(events, is_comm) / steps / 1e9,
            "collective_kernels": sorted({name.split("(")[0][:60] for name in by_name if is_comm(name)})}


def bench(config, steps: int, warmup: int, split: bool = True, mesh=None, profile_dir: str = "") -> dict:
    """Time ``steps`` train steps of ``config``; returns the row of the table.

    With ``split`` the row also has ``fwd_bwd_s`` and ``optimizer_s`` (``split_programs``, timed
    the same way after the step, from its state): the median seconds of the gradients alone and of
    the optimizer update alone; ``fwd_bwd_s`` is None with optim.accum_steps > 1 (the step then
    scans microbatches). ``mesh``: default, every device under ``config.mesh``. With ``profile_dir``,
    also the collectives' time per step (``collective_share``).
    """
    setup = setup_training(config, mesh or mesh_lib.make_mesh(config.mesh))
    t, mcfg, mesh, rules = config.train, setup.mcfg, setup.mesh, setup.rules
    batch = sharding.global_batch(random_batch(setup), mesh, rules)
    split_row = {}
    with sharding.activate(mesh, rules):
        state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.PRNGKey(0))
        t0 = time.perf_counter()
        compiled = setup.jit_train_step().lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        state, m, times = _timed(lambda s: compiled(s, batch), state, steps, warmup)
        stats = jax.devices()[0].memory_stats() or {}  # the train step's peak, before the split programs
        if profile_dir:
            split_row.update(collective_share(compiled, state, batch, profile_dir))
        if split:
            split_row.update(_bench_split(setup, state, batch, steps, warmup))  # donates the state
            del state
    step_s = statistics.median(times)
    tokens_per_s = t.batch_size * t.seq_len / step_s
    return {
        "step_s": step_s,
        "step_s_spread": [min(times), max(times)],
        "tokens_per_s": tokens_per_s,
        "flops_per_token": setup.model.flops_per_token(mcfg, t.seq_len),
        "compile_s": compile_s,
        "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
        "planned_mem_gb": aot.live_bytes(compiled.memory_analysis()) / 1e9,
        "loss": float(m["loss"]),
        **split_row,
    }


def copy_bandwidth(gib: float = 2.0, passes: int = 20, reps: int = 5) -> float:
    """Measured bytes/s of an elementwise pass (read + write) over a ``gib`` GiB bf16 array.

    ``passes`` passes run in one program (a loop on the device, an optimisation barrier between passes so
    none are fused), so no launch gap or host round trip is timed and the device stays busy long enough to
    hold its clocks; the fastest of ``reps`` calls counts, as a ceiling should. On one H200 this read
    3.16-3.18 TB/s five times in one process, where one pass a call timed on the host read 2.26-2.95."""
    x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
    run = jax.jit(lambda a: jax.lax.fori_loop(0, passes, lambda _, b: jax.lax.optimization_barrier(b * 2), a))
    return 2 * x.nbytes * passes / min(wall_seconds(run, x, reps=reps))


def bench_decode(config, batch: int, prompt_len: int, new_tokens: int, reps: int = 3, mesh=None) -> dict:
    """Greedy decoding of ``new_tokens`` after random ``prompt_len``-token prompts, bf16 weights.

    Decode time is the difference between generating ``new_tokens`` and 1 token with the same
    compiled program, so the prefill is excluded; bytes per decode step are the bf16 weights
    (embedding gather excluded) plus the whole cache ``model.init_cache`` builds (``cache_nbytes``),
    read once: the KV cache the attention reads, or a recurrent family's state (which each step
    also writes back whole; that write is not counted). ``mesh``: for validating the config only.
    """
    config = config.copy_and_resolve_references()
    config.model.param_dtype = "bfloat16"
    setup = setup_training(config, mesh or mesh_lib.make_mesh(config.mesh))  # validation only: decoding is unsharded
    model, mcfg = setup.model, setup.mcfg
    params = jax.jit(model.init, static_argnums=0)(mcfg, jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(3, mcfg.vocab_size, (batch, prompt_len)).tolist()
    max_len = prompt_len + new_tokens

    def run(n):
        t = time.perf_counter()
        generate.greedy(model, params, mcfg, prompts, max_new_tokens=n, max_len=max_len)
        return time.perf_counter() - t

    first_call_s = run(new_tokens)  # compiles (one program for every number of new tokens), then warms up
    run(1)
    full = statistics.median(run(new_tokens) for _ in range(reps))
    prefill = statistics.median(run(1) for _ in range(reps))
    step_s = (full - prefill) / (new_tokens - 1)
    weight_bytes = 2 * model.matmul_params(mcfg)
    cache_bytes = cache_nbytes(model, mcfg, batch, max_len)
    return {"batch": batch, "tokens_per_s": batch * new_tokens / full, "decode_tokens_per_s": batch / step_s,
            "decode_step_ms": 1e3 * step_s, "prefill_s": prefill, "total_s": full,
            "first_call_s": first_call_s, "weight_bytes": weight_bytes, "cache_bytes": cache_bytes,
            "hbm_bytes_per_s": (weight_bytes + cache_bytes) / step_s}


def cache_nbytes(model, mcfg, batch: int, max_len: int) -> int:
    """Bytes of the decoding cache ``model.init_cache`` builds (every leaf; shapes only, nothing allocated).

    Transformer: k and v [layers, batch, max_len, kv_heads, head_dim] in the compute dtype, plus the
    int32 segment ids [batch, max_len] and write index; Mamba: the conv buffers, float32 SSM states and
    segment ids, whatever max_len.
    """
    shapes = jax.eval_shape(lambda: model.init_cache(mcfg, batch, max_len))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


def kernel_events(logdir: str, gpu: int = 0) -> list[tuple[str, int, int]]:
    """(name, start ns, duration ns) of GPU ``gpu``'s kernels in the newest trace in ``logdir``."""
    from jax._src.profiler import ProfileData  # the trace reader jax ships

    path = max(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    return [(ev.name, ev.start_ns, ev.duration_ns) for plane in ProfileData.from_file(path).planes
            if re.match(rf"/device:GPU:{gpu}(\D|$)", plane.name)
            for line in plane.lines if line.name.startswith("Stream") for ev in line.events]


def tabulate(events) -> tuple[dict[str, tuple[int, int]], int]:
    """({name: (total ns, launches)}, wall ns from the first kernel's start to the last one's end) of
    ``kernel_events``."""
    by_name = {}
    for name, _, duration in events:
        total, count = by_name.get(name, (0, 0))
        by_name[name] = (total + duration, count + 1)
    wall = max(s + d for _, s, d in events) - min(s for _, s, _ in events) if events else 0
    return by_name, wall


def exposed_ns(events, is_comm) -> int:
    """Nanoseconds during which a kernel ``is_comm(name)`` runs and no other kernel does (communication that
    no compute hides), from (name, start, duration) events of one GPU."""
    def union(spans):
        merged = []
        for s, e in sorted(spans):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        return merged

    comm = union([(s, s + d) for n, s, d in events if is_comm(n)])
    busy = union([(s, s + d) for n, s, d in events if not is_comm(n)])
    total, j = 0, 0
    for s, e in comm:
        covered = 0
        while j < len(busy) and busy[j][1] <= s:
            j += 1
        k = j
        while k < len(busy) and busy[k][0] < e:
            covered += min(e, busy[k][1]) - max(s, busy[k][0])
            k += 1
        total += (e - s) - covered
    return total


def kernel_table(logdir: str, steps: int, top: int = 25) -> str:
    """GPU 0's kernels in the trace in ``logdir`` per step: busy time, launches, the costliest names."""
    by_name, wall = tabulate(kernel_events(logdir))
    if not by_name:
        return "no device kernels in the trace"
    busy, launches = sum(t for t, _ in by_name.values()), sum(n for _, n in by_name.values())
    rows = [f"per step: {busy / steps / 1e3:.0f} us busy of {wall / steps / 1e3:.0f} us wall, "
            f"{launches / steps:.0f} launches", f"{'us/step':>9}{'n/step':>8}  kernel"]
    for name, (total, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        rows.append(f"{total / steps / 1e3:>9.1f}{count / steps:>8.1f}  {name[:110]}")
    return "\n".join(rows)


def profile_decode(config, batch: int, prompt_len: int, logdir: str, steps: int = 32) -> str:
    """Trace one greedy call of ``steps`` + 1 new tokens (compiled beforehand) and tabulate its kernels."""
    config = config.copy_and_resolve_references()
    config.model.param_dtype = "bfloat16"
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh))
    params = jax.jit(setup.model.init, static_argnums=0)(setup.mcfg, jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(3, setup.mcfg.vocab_size, (batch, prompt_len)).tolist()

    def run():
        generate.greedy(setup.model, params, setup.mcfg, prompts, max_new_tokens=steps + 1,
                        max_len=prompt_len + 256)

    run()
    os.makedirs(logdir, exist_ok=True)
    with jax.profiler.trace(logdir):
        run()
    return kernel_table(logdir, steps)


def main(argv):
    del argv
    cli.out_file(_OUT.value)
    variants = parse_variants(_VARIANTS.value, _CONFIG.value)
    if _DECODE.value:
        bandwidth = copy_bandwidth()
        rows = [{"variant": name, **bench_decode(apply_overrides(_CONFIG.value, spec), int(b), _PROMPT.value,
                                                  _NEW.value)}
                for name, spec in variants for b in _DECODE.value]
        print(f"\ndevice: {jax.devices()[0].device_kind}, jax {jax.__version__}, copy bandwidth "
              f"{bandwidth / 1e12:.2f} TB/s; prompt {_PROMPT.value}, {_NEW.value} new tokens, greedy, bf16")
        print(f"{'variant':<16}{'batch':>6}{'tokens/s':>11}{'decode tok/s':>14}{'step ms':>9}{'HBM TB/s':>10}"
              f"{'of copy':>9}{'first call s':>13}")
        for r in rows:
            r["fraction_of_copy"] = r["hbm_bytes_per_s"] / bandwidth
            print(f"{r['variant']:<16}{r['batch']:>6}{r['tokens_per_s']:>11.0f}{r['decode_tokens_per_s']:>14.0f}"
                  f"{r['decode_step_ms']:>9.2f}{r['hbm_bytes_per_s'] / 1e12:>10.2f}{r['fraction_of_copy']:>9.2f}"
                  f"{r['first_call_s']:>13.1f}")
        if _OUT.value:
            with open(_OUT.value, "w") as f:
                json.dump({"copy_bytes_per_s": bandwidth, "rows": rows}, f, indent=1)
        if _PROFILE.value:
            for name, spec in variants:
                print(f"\n{name}, batch {_DECODE.value[0]}:")
                print(profile_decode(apply_overrides(_CONFIG.value, spec), int(_DECODE.value[0]), _PROMPT.value,
                                     os.path.join(_PROFILE.value, name)))
        return
    base = _CONFIG.value
    ceiling = matmul_ceiling()
    peak = metrics.peak_flops(jax.devices()[0])
    rows = {}
    for name, spec in variants:
        try:
            row = bench(apply_overrides(base, spec), _STEPS.value, _WARMUP.value, split=_SPLIT.value,
                        profile_dir=_TRACE.value and os.path.join(_TRACE.value, name))
        except Exception as e:  # one failing variant (out of memory, a refused config) leaves the others' rows
            rows[name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
            print(f"{name}: failed: {rows[name]['error']}", flush=True)
            continue
        n = jax.device_count()
        row["mfu_datasheet"] = row["flops_per_token"] * row["tokens_per_s"] / (peak * n) if peak else None
        row["mfu_measured_ceiling"] = row["flops_per_token"] * row["tokens_per_s"] / (ceiling * n)
        rows[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
        if _TRACE.value:
            print(kernel_table(os.path.join(_TRACE.value, name), 3, top=40), flush=True)
    print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s (8192^3), datasheet {peak and peak / 1e12} TFLOP/s")
    print(f"{'variant':<24}{'step s':>9}{'fwd+bwd s':>11}{'opt s':>9}{'tokens/s':>11}{'MFU(sheet)':>12}"
          f"{'MFU(meas)':>11}{'mem GB':>8}{'plan GB':>9}{'compile s':>11}")

    def seconds(value, width):
        return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"

    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<24}failed: {r['error'][:100]}")
            continue
        sheet = f"{r['mfu_datasheet']:.3f}" if r["mfu_datasheet"] is not None else "-"
        print(f"{name:<24}{r['step_s']:>9.4f}{seconds(r.get('fwd_bwd_s'), 11)}{seconds(r.get('optimizer_s'), 9)}"
              f"{r['tokens_per_s']:>11.0f}{sheet:>12}{r['mfu_measured_ceiling']:>11.3f}"
              f"{r['peak_mem_gb']:>8.1f}{r['planned_mem_gb']:>9.1f}{r['compile_s']:>11.1f}")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "ceiling_flops": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run(main)
