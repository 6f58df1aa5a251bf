"""Compile a config's train step ahead of time for a TPU topology, on a machine without TPUs.

    python -m train.aot --config experiments/NAME.py --topology v5e:4x4 [--config.mesh.fsdp=16 ...]

The TPU compiler in ``libtpu`` builds compile-only devices for a named slice
(``jax.experimental.topologies``); the config's mesh is laid over them and the train step is
lowered and compiled exactly as the trainer does it: same validation, same state and batch
shardings, same donation. The compiled executable reports per-chip memory (arguments,
outputs, temporaries, generated code) and FLOPs. A config that does not fit, because its mesh
or sizes do not divide the slice or because a chip's HBM is too small, fails here in seconds
to minutes instead of on the pod. Exit status: 0 when it fits, 1 otherwise.

Topologies are ``GENERATION:SHAPE`` with the chip grid of the slice: ``v5e:2x2``, ``v5e:4x4``,
``v6e:8x8`` (2-D) or ``v4:2x2x2``, ``v5p:4x4x4`` (3-D). v4 and v5p are compiled in megacore
mode (one device per chip, both TensorCores), as JAX runs them by default.

Needs libtpu, the TPU compiler, at the release the installed jax pins:
``pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"`` (about 220 MB
to download, 690 MB installed). Before libtpu is first loaded, ``topology_devices`` sets (unless
already set) ``TPU_SKIP_MDS_QUERY=1`` (otherwise libtpu asks the GCE metadata server about the
attached slice, retrying for minutes), ``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_ID``,
``TPU_WORKER_HOSTNAMES`` (what that server would say; otherwise libtpu warns about each) and
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (no chip is claimed, so another JAX process holding
``/tmp/libtpu_lockfile`` is no obstacle). The command itself runs JAX on the CPU only
(unless ``JAX_PLATFORMS`` says otherwise); as a library, this module leaves the process's
backends as they are, so tests on CPU devices can compile for a TPU slice in between.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Callable

import jax
from absl import flags
from jax.experimental import topologies
from ml_collections import config_flags

from parallel import mesh as mesh_lib
from parallel import sharding
from train import cli, config as train_config, metrics
from train.setup import setup_training

MiB, GiB = 1 << 20, 1 << 30
DEFAULT_HOST_BOUNDS = (2, 2, 1)  # chips per host of multi-host slices, as libtpu assumes


@dataclasses.dataclass(frozen=True)
class Chip:
    device_kind: str          # what libtpu calls the devices of this generation
    hbm_bytes: int            # HBM per chip
    accelerator_type: Callable[[int], str]  # Cloud TPU accelerator type of a slice of n chips
    topology_kwargs: tuple = ()  # extra options for the topology (chip configuration)
    dims: int = 2             # rank of the chip grid


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, lambda n: f"v4-{2 * n}", (("chip_config_name", "megacore"),), dims=3),
    "v5e": Chip("TPU v5 lite", 16 * GiB, lambda n: f"v5litepod-{n}"),
    "v5p": Chip("TPU v5", 95 * GiB, lambda n: f"v5p-{2 * n}", (("chip_config_name", "megacore"),), dims=3),
    "v6e": Chip("TPU v6 lite", 32 * GiB, lambda n: f"v6e-{n}"),
}


class DoesNotFit(ValueError):
    """The train step needs more memory per chip than the chip has (or than the budget given).

    ``report`` is the measurement, or None when the TPU compiler itself refused the program
    (its message, quoted, then gives the numbers).
    """

    def __init__(self, message: str, report: AotReport | None = None):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------- topology

def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v5e:4x4' -> ('v5e', (4, 4)); ValueError naming the accepted forms otherwise."""
    m = re.fullmatch(r"\s*([a-z0-9]+):(\d+(?:x\d+)*)\s*", name)
    generation, dims = (m.group(1), tuple(int(d) for d in m.group(2).split("x"))) if m else (None, ())
    if generation not in CHIPS or len(dims) != CHIPS[generation].dims or min(dims) < 1:
        examples = ", ".join(f"{g}:{'x'.join(['2'] * c.dims)}" for g, c in CHIPS.items())
        raise ValueError(f"--topology {name!r} is not a TPU slice this tool knows; write GENERATION:SHAPE with "
                         f"the chip grid, e.g. {examples} (generations: {', '.join(CHIPS)}).")
    return generation, dims


def _configure_libtpu(chip: Chip, n_chips: int) -> None:
    """Environment for loading libtpu as a compiler only, on a machine that is not a Cloud TPU VM.

    Must be set before the TPU plugin is first loaded in this process (it reads them once);
    variables already set are left alone.
    """
    defaults = {
        # libtpu otherwise asks the GCE metadata server about the attached slice and retries for minutes.
        "TPU_SKIP_MDS_QUERY": "1",
        # What the metadata server would have said; without them libtpu prints warnings for each.
        "TPU_ACCELERATOR_TYPE": chip.accelerator_type(n_chips),
        "TPU_WORKER_ID": "0",
        "TPU_WORKER_HOSTNAMES": "localhost",
        # Compile-only: no chip is claimed, so do not take (or wait for) /tmp/libtpu_lockfile, which
        # any other JAX process on this machine that probed for TPUs may hold.
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def topology_devices(name: str) -> list[jax.Device]:
    """The compile-only devices of a TPU slice, e.g. ``topology_devices('v5e:4x4')`` -> 16 devices."""
    generation, dims = parse_topology(name)
    chip = CHIPS[generation]
    _configure_libtpu(chip, math.prod(dims))
    # A slice smaller than a host (v5e:1x1, v5e:2x1...) is one host of that many chips.
    host_bounds = [min(n, h) for n, h in zip(dims + (1,) * (3 - len(dims)), DEFAULT_HOST_BOUNDS)]
    try:
        topology = topologies.get_topology_desc(name.strip(), "tpu", chips_per_host_bounds=host_bounds,
                                                **dict(chip.topology_kwargs))
    except RuntimeError as e:
        if "not installed" in str(e):
            raise ImportError(f"the TPU compiler (libtpu) is not installed; pip install "
                               f"'jax[tpu]=={jax.__version__}' (it pins the libtpu release this jax was built "
                               f"against).") from None
        if "INVALID_ARGUMENT" in str(e):
            raise ValueError(f"--topology {name!r} is not a valid {generation} slice: "
                             f"{str(e).splitlines()[0]}") from None
        raise
    devices = list(topology.devices)
    kinds = {d.device_kind for d in devices}
    if kinds != {chip.device_kind} or len({tuple(d.coords) for d in devices}) != len(devices):
        raise RuntimeError(f"libtpu returned {len(devices)} {sorted(kinds)} devices for --topology {name!r}; "
                           f"expected one {chip.device_kind!r} device per chip.")
    return devices


# ----------------------------------------------------------------------------- compile and report

@dataclasses.dataclass(frozen=True)
class AotReport:
    """Per-chip numbers of one train step compiled for a TPU slice (bytes and FLOPs per chip)."""
    topology: str
    device_kind: str
    chips: int
    hosts: int
    mesh_shape: dict                 # mesh axis -> size, all of ``mesh_lib.MESH_AXES``
    compile_s: float
    argument_bytes: int              # state and batch shards
    output_bytes: int                # new state and metrics
    alias_bytes: int                 # outputs written in place of donated arguments
    temp_bytes: int                  # activations, gradients, workspace
    code_bytes: int                  # the program itself
    hbm_bytes: int                   # the budget checked against: the chip's HBM unless overridden
    chip_hbm_bytes: int              # the chip's HBM
    flops: float | None              # XLA's count for one step on one chip (recomputation included)
    model_flops: float               # the model's ``flops_per_token`` x tokens per step / chips

    @property
    def total_bytes(self) -> int:
        """Live at once on a chip: arguments + outputs not written in place + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def mesh_description(self) -> str:
        return _describe_mesh(self.mesh_shape)

    def format(self) -> str:
        unit, name = (GiB, "GiB") if self.total_bytes >= GiB // 2 else (MiB, "MiB")

        def gib(b):
            return f"{b / unit:9.3f} {name}"

        chips = f"{self.chips} chip" + "s" * (self.chips != 1)
        hosts = f", {self.hosts} hosts" if self.hosts > 1 else ""
        rows = [
            ("topology", f"{self.topology} ({self.device_kind}, {chips}{hosts})"),
            ("mesh", self.mesh_description()),
            ("compile", f"{self.compile_s:.1f} s"),
            ("per chip", ""),
            ("  arguments", gib(self.argument_bytes)),
            ("  outputs", gib(self.output_bytes)),
            ("  aliased", f"{gib(-self.alias_bytes)}   (outputs in donated arguments)"),
            ("  temporaries", gib(self.temp_bytes)),
            ("  generated code", gib(self.code_bytes)),
            ("  total", f"{gib(self.total_bytes)}   of {_size(self.hbm_bytes)} "
                        f"{'HBM' if self.hbm_bytes == self.chip_hbm_bytes else 'budget'} "
                        f"({100 * self.total_bytes / self.hbm_bytes:.1f}%)"),
        ]
        if self.flops is not None:
            rows.append(("FLOPs/step/chip", f"{self.flops:.3e} (XLA cost analysis; counts a loop body, e.g. "
                                            f"the layer scan, once)"))
        peak = metrics.PEAK_FLOPS.get(self.device_kind)
        bound = f", >= {1e3 * self.model_flops / peak:.3g} ms/step at peak bf16" if peak else ""
        rows.append(("model FLOPs", f"{self.model_flops:.3e} per step per chip (6N + attention){bound}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def live_bytes(mem) -> int:
    """Bytes live at once per device by XLA's ``memory_analysis()`` of a compiled program: arguments +
    outputs not written in place + temporaries + code (nothing is allocated or run)."""
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)


def _size(b: int) -> str:
    """'16 GiB', '2.26 GiB', '19.4 MiB'."""
    if b >= GiB:
        return f"{b / GiB:.3g} GiB"
    return f"{b / MiB:.3g} MiB"


def _describe_mesh(shape) -> str:
    """'fsdp=8 x tensor=2' from a mesh shape (axes of size 1 left out)."""
    return " x ".join(f"{a}={n}" for a, n in dict(shape).items() if n > 1) or "1 device"


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend and version implements it
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    value = (cost or {}).get("flops")
    return float(value) if value is not None and value >= 0 else None


_ADVICE = ("shard more (mesh.fsdp, mesh.tensor), lower train.batch_size or train.seq_len, raise "
           "optim.accum_steps, or recompute more (model.remat='full').")


def _compiler_out_of_memory(error: Exception) -> str | None:
    """The TPU compiler's own refusal of a program larger than HBM, as one line (None for other errors)."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "memory" in line.lower() or "hbm" in line.lower()),
                lines[0] if lines else "RESOURCE_EXHAUSTED").rstrip(".")


def compile_for_topology(config, topology: str, *, hbm_bytes: int | None = None,
                         check_memory: bool = True) -> AotReport:
    """Compile ``config``'s train step for the TPU slice ``topology`` (e.g. 'v5e:4x4') and measure it.

    ``hbm_bytes`` is the per-chip budget to check against (default: the chip's HBM; less keeps
    headroom). Raises ValueError (one sentence naming the field) for a bad config, a mesh that
    does not cover the slice, or sizes the mesh cannot split; ``DoesNotFit`` (a ValueError) when
    ``check_memory`` and the step needs more than the budget, or the TPU compiler refuses it for
    lack of HBM. Nothing is allocated: the state and batch are abstract.
    """
    train_config.validate(config)  # config errors first, before the TPU compiler is loaded
    generation, _ = parse_topology(topology)
    chip, topology = CHIPS[generation], topology.strip()
    devices = topology_devices(topology)
    try:
        mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    except ValueError as e:
        raise ValueError(f"{topology} has {len(devices)} devices: {e}") from None
    setup = setup_training(config, mesh)
    budget = chip.hbm_bytes if hbm_bytes is None else hbm_bytes
    where = f"on {topology} with mesh {_describe_mesh(mesh.shape)}"
    t0 = time.perf_counter()
    try:
        with sharding.activate(mesh, setup.rules):
            compiled = setup.jit_train_step().lower(setup.abstract_state(), setup.abstract_batch()).compile()
    except Exception as e:  # JaxRuntimeError lives in different modules across jax versions
        refusal = _compiler_out_of_memory(e)
        if refusal is None or not check_memory:
            raise
        raise DoesNotFit(f"the train step does not fit in the {_size(chip.hbm_bytes)} HBM of a "
                         f"{chip.device_kind} chip {where}: the TPU compiler reports '{refusal}'; {_ADVICE}") from e
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    t = config.train
    report = AotReport(
        topology=topology, device_kind=chip.device_kind, chips=len(devices),
        hosts=len({d.process_index for d in devices}), mesh_shape=dict(mesh.shape), compile_s=compile_s,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes), hbm_bytes=budget,
        chip_hbm_bytes=chip.hbm_bytes, flops=_flops(compiled),
        model_flops=setup.model.flops_per_token(setup.mcfg, t.seq_len) * t.batch_size * t.seq_len / len(devices))
    if check_memory and not report.fits:
        what = "HBM" if budget == chip.hbm_bytes else "budget (of its HBM)"
        raise DoesNotFit(f"the train step needs {_size(report.total_bytes)} per chip {where}, "
                         f"{_size(report.total_bytes - budget)} more than the {_size(budget)} {what} of a "
                         f"{chip.device_kind} chip; {_ADVICE}", report)
    return report


# ----------------------------------------------------------------------------- command line

def main(argv) -> int:
    del argv
    hbm_gib = flags.FLAGS.hbm_gib
    try:
        report = compile_for_topology(flags.FLAGS.config, flags.FLAGS.topology,
                                      hbm_bytes=int(hbm_gib * GiB) if hbm_gib else None)
    except DoesNotFit as e:  # the measurement first, then the one line (train.cli)
        if e.report is not None:
            print(e.report.format(), flush=True)
        raise
    print(report.format())
    return 0


def _cli() -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/NAME.py).")
    flags.DEFINE_string("topology", None, f"TPU slice as GENERATION:SHAPE, e.g. v5e:4x4 or v5p:2x2x2 "
                                          f"(generations: {', '.join(CHIPS)}).")
    flags.DEFINE_float("hbm_gib", 0.0, "Per-chip memory budget in GiB to check against (default: the chip's "
                                       "HBM); set it lower to keep headroom.")
    flags.mark_flags_as_required(["config", "topology"])
    # Only the CPU is needed besides the TPU compiler; do not let JAX probe for (or claim) TPU chips.
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    # config, mesh, divisibility, topology and DoesNotFit are ValueErrors; ImportError: no libtpu.
    cli.run(main, errors=(ImportError,))


if __name__ == "__main__":
    _cli()
