"""Test-wide setup (must run before jax is imported): 8 host CPU devices for sharding tests, and a
compilation cache shared by the whole session.

Compile time dominates this suite: many tests (and the subprocesses they start, which inherit the
environment) compile the same tiny programs again, e.g. each ``trainer.run`` of one config builds
new closures. A persistent compilation cache in a fresh directory per session (shared by the xdist
workers: the controller sets it before starting them) serves those repeats; it changes no result,
only whether XLA compiles a program again. ``XLA_FLAGS`` also lowers the backend optimization level,
as ``tests.helpers.jit`` does (run time does not matter at these sizes), and on jaxlib < 0.11 turns off
the CPU fusion emitters (the older elemental emitter compiles a train step ~4x faster; jaxlib 0.11
no longer has the flag, and XLA aborts on an unknown flag).
"""
import importlib.metadata
import os
import shutil
import tempfile


def xla_flags(devices: int = 8) -> str:
    """The suite's XLA_FLAGS with ``devices`` host CPU devices (also for the subprocesses tests start)."""
    flags = [f"--xla_force_host_platform_device_count={devices}", "--xla_backend_optimization_level=0"]
    try:
        version = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        version = None
    if version is not None and version < (0, 11):
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return " ".join(flags)


os.environ.setdefault("XLA_FLAGS", xla_flags())
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="loom-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if _OWN_CACHE:  # the process that made the directory (the xdist controller) removes it at the end
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
