"""Training-speed peer for Mamba: the official CUDA implementation, timed as ``train.bench`` times loom.

    python experiments/peers/mamba_official.py --src DIR --out FILE [--shapes 16x2048,4x8192,1x32768]
        [--steps 8] [--warmup 3] [--scan] [--build DIR]

DIR holds checkouts of the two repositories (nothing is fetched): DIR/mamba (state-spaces/mamba) and
DIR/causal-conv1d (Dao-AILab/causal-conv1d). Both CUDA extensions are built for this GPU's architecture
with torch's JIT extension builder and the flags of their own setup.py (about 9 minutes on a 16-core
H200 host); the builds are cached in --build (default DIR/build), so a later call reuses them.

The model is ``experiments/bench_mamba_370m.py``'s: MambaLMHeadModel with d_model 1024, 48 layers,
vocab 32000, tied embeddings, the package's defaults otherwise (fused add+RMSNorm, the fused
``mamba_inner_fn`` with the CUDA selective scan and causal_conv1d). Training as the package does it:
float32 parameters, bf16 autocast, fused AdamW, no activation checkpointing. Each shape (batch x length)
runs ``--warmup`` steps, then ``--steps`` timed steps one by one (synchronized); the median step gives
tokens/s. ``--scan`` also times ``selective_scan_fn`` alone (forward, forward+backward) at batch 8,
length 2048, 4096 channels, state 16, with z and the dt softplus, as ``experiments/bench_mamba_scan.py``
does for loom's kernel. Prints one line per result and writes them all to FILE as JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import types

MODEL = dict(d_model=1024, n_layer=48, vocab_size=32000)
# The packages' model families other than Mamba-1, and their helpers, which MambaLMHeadModel's module imports
# but this model does not use: stand-ins if their own dependencies are missing here.
UNUSED = {"mamba_ssm.modules.mamba2": ["Mamba2"], "mamba_ssm.modules.mamba3": ["Mamba3"],
          "mamba_ssm.modules.mha": ["MHA"], "mamba_ssm.utils.generation": ["GenerationMixin"],
          "mamba_ssm.utils.hf": ["load_config_hf", "load_state_dict_hf"]}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) <= 0 for s in shapes):
        raise ValueError(f"--shapes is {text!r}; use BATCHxLENGTH items separated by commas, e.g. 16x2048,4x8192.")
    return shapes


def check_sources(src: str) -> dict:
    """The source folders the build and the imports need, or a one-sentence error naming the missing one."""
    paths = {"scan": os.path.join(src, "mamba", "csrc", "selective_scan"), "mamba": os.path.join(src, "mamba"),
             "conv": os.path.join(src, "causal-conv1d", "csrc"), "conv_pkg": os.path.join(src, "causal-conv1d")}
    for need in (paths["scan"], os.path.join(src, "mamba", "mamba_ssm"), paths["conv"],
                 os.path.join(src, "causal-conv1d", "causal_conv1d")):
        if not os.path.isdir(need):
            raise ValueError(f"--src {src!r} has no {os.path.relpath(need, src)}/; put a checkout of "
                             "state-spaces/mamba in DIR/mamba and one of Dao-AILab/causal-conv1d in DIR/causal-conv1d.")
    return paths


def build(paths: dict, build_dir: str):
    """Both extensions, compiled for this GPU with the official setup.py's flags; returns the two modules."""
    import torch
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    nvcc = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr",
            "--expt-extended-lambda", "--use_fast_math", "-lineinfo", "--threads", "4",
            "-gencode", f"arch=compute_{major}{minor},code=sm_{major}{minor}"]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    modules = []
    for name, folder in (("selective_scan_cuda", paths["scan"]), ("causal_conv1d_cuda", paths["conv"])):
        out = os.path.join(build_dir, name)
        os.makedirs(out, exist_ok=True)
        sources = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".cpp", ".cu")))
        modules.append(cpp_extension.load(name, sources, extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=nvcc,
                                          extra_include_paths=[folder], build_directory=out, verbose=False))
    return modules


def import_official(paths: dict, build_dir: str):
    """MambaLMHeadModel, MambaConfig and selective_scan_fn from the checkouts, the built extensions in place
    of installed ones; raises if the model would not take the fused CUDA path."""
    scan_ext, conv_ext = build(paths, build_dir)
    sys.modules["selective_scan_cuda"], sys.modules["causal_conv1d_cuda"] = scan_ext, conv_ext
    sys.path.insert(0, paths["conv_pkg"])
    package = types.ModuleType("mamba_ssm")  # the package without its __init__, which imports every family
    package.__path__ = [os.path.join(paths["mamba"], "mamba_ssm")]
    sys.modules["mamba_ssm"] = package
    for name, attrs in UNUSED.items():
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (any failure: a stand-in, reported)
            print(f"{name}: not importable here ({type(e).__name__}); a stand-in, unused by this model", flush=True)
            stub = types.ModuleType(name)
            for attr in attrs:
                setattr(stub, attr, type(attr, (), {}))
            sys.modules[name] = stub
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    if mamba_simple.causal_conv1d_fn is None:
        raise RuntimeError("causal_conv1d did not import, so Mamba would not take its fused path.")
    return MambaLMHeadModel, MambaConfig, selective_scan_fn


def median_step(fn, steps: int, warmup: int) -> tuple[float, list[float]]:
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), [min(times), max(times)]


def time_shape(MambaLMHeadModel, MambaConfig, batch, length, steps, warmup) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**MODEL), device="cuda", dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    ids = torch.randint(0, MODEL["vocab_size"], (batch, length + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    median, spread = median_step(step, steps, warmup)
    return dict(step_s=round(median, 5), step_s_spread=[round(t, 5) for t in spread],
                tokens_per_s=round(batch * length / median, 1),
                peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))


def time_training(MambaLMHeadModel, MambaConfig, shapes, steps, warmup) -> dict:
    import torch
    results = {}
    for batch, length in shapes:
        try:
            results[f"{batch}x{length}"] = time_shape(MambaLMHeadModel, MambaConfig, batch, length, steps, warmup)
        except torch.cuda.OutOfMemoryError:
            results[f"{batch}x{length}"] = {"error": "out of memory"}
        print(f"{batch}x{length}:", results[f"{batch}x{length}"], flush=True)
        torch.cuda.empty_cache()
    return results


def time_scan(selective_scan_fn, steps, warmup) -> dict:
    import torch
    b, s, E, N = 8, 2048, 4096, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u, delta, z = (torch.randn(b, E, s, generator=g, **bf) for _ in range(3))
    B, C = (torch.randn(b, N, s, generator=g, **bf) for _ in range(2))
    f32 = dict(device="cuda", dtype=torch.float32, requires_grad=True)
    A, D, bias = -torch.rand(E, N, **f32), torch.randn(E, **f32), torch.randn(E, **f32)
    fwd = lambda: selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)  # noqa: E731
    gy = torch.randn_like(fwd())

    def fwd_bwd():
        fwd().backward(gy)

    with torch.no_grad():
        f, _ = median_step(fwd, steps, warmup)
    fb, _ = median_step(fwd_bwd, steps, warmup)
    out = {"shape": f"{b}x{s}x{E}x{N}", "fwd_ms": round(1e3 * f, 3), "fwd_bwd_ms": round(1e3 * fb, 3)}
    print("selective_scan_fn:", out, flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--build", default=None)
    parser.add_argument("--shapes", default="16x2048,4x8192,1x32768")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scan", action="store_true")
    args = parser.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
        if args.steps <= 0 or args.warmup < 0:
            raise ValueError(f"--steps {args.steps} / --warmup {args.warmup}: use at least 1 timed step and 0 or "
                             "more warm-up steps.")
        paths = check_sources(args.src)
        import torch
        if not torch.cuda.is_available():
            raise ValueError("no CUDA GPU is visible to torch; this peer runs on an NVIDIA GPU.")
    except ValueError as e:
        print(f"mamba_official: {e}", file=sys.stderr)
        return 2
    start = time.time()
    build_dir = args.build or os.path.join(args.src, "build")
    try:
        MambaLMHeadModel, MambaConfig, selective_scan_fn = import_official(paths, build_dir)
    except Exception as e:  # noqa: BLE001 (a compiler's or an import's failure: one sentence, its first line)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"mamba_official: building or importing the official extensions failed ({type(e).__name__}: {first}); "
              f"the build's logs are in {build_dir}.", file=sys.stderr)
        return 1
    results = {"build_s": round(time.time() - start, 1), "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "model": MODEL}
    print(f"built and imported in {results['build_s']} s", flush=True)
    if args.scan:
        results["scan"] = time_scan(selective_scan_fn, args.steps * 3, args.warmup)
    results["train"] = time_training(MambaLMHeadModel, MambaConfig, shapes, args.steps, args.warmup)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
