"""The device mesh and multi-process start-up.

The mesh has six named axes, outermost first::

    data, stage, fsdp, expert, context, tensor

Axes that communicate most sit innermost, so that they span neighbouring devices (the same
host, the fastest links): ``tensor`` all-reduces activations in every layer, ``context``
passes key/value blocks around a ring in every attention layer, ``expert`` does two
all-to-alls per MoE layer, ``fsdp`` all-gathers weights and reduce-scatters gradients once
per layer (overlappable with compute), ``stage`` only passes activations between pipeline
stages, and ``data`` all-reduces gradients once per step. ``data`` is outermost so that it
is the axis that crosses hosts: each process then holds whole rows of the batch.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "stage", "fsdp", "expert", "context", "tensor")

# Environment variables read by ``initialize_distributed`` when the config leaves a field unset.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Axis sizes in ``MESH_AXES`` order from the config's ``mesh`` section (missing axes are 1).

    One axis may be -1: it takes the devices the others leave. Raises ValueError with one
    sentence when an axis is unknown, a size is not a positive integer, more than one axis
    is -1, or the product differs from ``n_devices``.
    """
    cfg = dict(mesh_cfg)
    unknown = sorted(set(cfg) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh.{unknown[0]} is not a mesh axis; use only {list(MESH_AXES)}.")
    sizes = {a: cfg.get(a, 1) for a in MESH_AXES}
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size <= 0 and size != -1):
            raise ValueError(f"mesh.{axis} is {size!r}; use a positive integer, or -1 for the remaining devices.")
    rest = [a for a, n in sizes.items() if n == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh.{rest[0]} and mesh.{rest[1]} are both -1; at most one axis may take "
                         f"the remaining devices.")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    described = " x ".join(f"{a}={n}" for a, n in sizes.items() if n != 1) or "all axes 1"
    if rest:
        if n_devices % fixed:
            raise ValueError(f"mesh {described} cannot cover {n_devices} devices: the fixed axes multiply to "
                             f"{fixed}, which does not divide {n_devices}; change their sizes.")
        sizes[rest[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(f"mesh {described} = {fixed} devices but {n_devices} are available; make the sizes "
                         f"multiply to {n_devices} or set one axis (e.g. mesh.data) to -1.")
    return tuple(int(sizes[a]) for a in MESH_AXES)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all devices of all processes) with ``MESH_AXES``.

    Every axis is ``AxisType.Auto``: ``jit`` partitions from the shardings of inputs, outputs
    and ``constrain`` calls. The device order comes from ``jax.make_mesh`` (topology-aware
    on TPU; process-major on CPU/GPU, so ``data`` splits across processes first).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _setting(value, env: str, unset):
    """The config value unless it equals ``unset``; then the environment variable (or None)."""
    if value is not None and value != unset:
        return value
    raw = os.environ.get(env, "")
    if not raw:
        return None
    try:
        return raw if unset == "" else int(raw)
    except ValueError:
        raise ValueError(f"environment variable {env}={raw!r} is not an integer; unset it or fix it.") from None


def initialize_distributed(dist_cfg: Mapping) -> bool:
    """Start multi-process JAX when the config or the environment asks for it; return whether it did.

    ``dist_cfg`` is the config's ``distributed`` section: ``coordinator_address`` ("" = unset),
    ``num_processes`` (0 = unset), ``process_id`` (-1 = unset). Unset fields fall back to
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With a
    coordinator address, ``jax.distributed.initialize`` is called with all three explicitly
    (each process runs the same command with its own process id); without one, this is a
    single-process run and nothing happens. Call it before anything else touches a device.
    """
    cfg = dict(dist_cfg)
    address = _setting(cfg.get("coordinator_address", ""), ENV_COORDINATOR, "")
    num = _setting(cfg.get("num_processes", 0), ENV_NUM_PROCESSES, 0)
    pid = _setting(cfg.get("process_id", -1), ENV_PROCESS_ID, -1)
    if not address:
        if num not in (None, 1):
            raise ValueError(f"distributed.num_processes is {num} but no coordinator address is set; set "
                             f"distributed.coordinator_address (or {ENV_COORDINATOR}) to host:port of process 0.")
        return False
    if num is None or num < 1:
        raise ValueError(f"distributed.coordinator_address is {address!r} but distributed.num_processes is "
                         f"{num}; set it (or {ENV_NUM_PROCESSES}) to the number of processes.")
    if pid is None or not 0 <= pid < num:
        raise ValueError(f"distributed.process_id is {pid} with {num} processes; set it (or {ENV_PROCESS_ID}) "
                         f"to this process's index in [0, {num}).")
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True
