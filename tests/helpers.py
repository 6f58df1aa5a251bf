"""Shared test helpers: tiny model configs, random parameters, relative error, tiny train configs, an H200
to lower GPU kernels for without one.

Tests compile many small programs; ``jit`` here uses a low XLA backend optimization level,
which cuts their compile time several-fold (run time does not matter at these sizes).
"""
from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import models

FAST_COMPILE = {"xla_backend_optimization_level": 0}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)

# XLA's default CPU code generation (its fusion emitters), which tests/conftest.py switches off on jaxlib
# < 0.11 for compile speed. The older emitter may round differently in different programs (by an ulp), so
# a check that two *different* programs agree bitwise or to float32 rounding compiles both with these.
DEFAULT_CODEGEN = ({"xla_cpu_use_fusion_emitters": True}
                   if "--xla_cpu_use_fusion_emitters=false" in os.environ.get("XLA_FLAGS", "") else {})

# Float32 compute so that comparisons against references are tight.
TINY = {
    "transformer": dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, dtype="float32"),
    "mamba": dict(vocab_size=61, d_model=16, n_layers=2, d_state=4, dtype="float32", chunk_size=4),
    "switch": dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, dtype="float32",
                   num_experts=4, moe_every=2, moe_group_size=8),
}
FAMILY = {"transformer": "transformer", "mamba": "mamba", "switch": "transformer"}


def h200():
    """A context in which ``.lower(lowering_platforms=("cuda",))`` targets an H200 without a GPU (newer jax takes
    the GPU model from an abstract mesh; older jax needs nothing)."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def tiny(name: str = "transformer", **overrides):
    """The model family's Config for the tiny size ``TINY[name]`` with ``overrides``."""
    model = models.get(FAMILY[name])
    return model.Config(**{**TINY[name], **overrides})


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def perturb_norms(params, axes, seed: int = 0):
    """``params`` with every norm scale (a leaf whose last logical axis is ``norm``) drawn from U(0.5, 1.5),
    so that no weight sits at its identity init and every weight matters in a comparison."""
    rng = np.random.default_rng(seed)

    def perturb(p, names):
        if names and names[-1] == "norm":
            return jnp.asarray(rng.uniform(0.5, 1.5, p.shape), p.dtype)
        return p

    return jax.tree.map(perturb, params, axes, is_leaf=lambda x: isinstance(x, tuple))


def random_params(cfg, seed: int = 0):
    """Parameters of ``cfg``'s family from ``init`` (seed ``seed``) with perturbed norm scales."""
    model = models.get("mamba" if type(cfg).__module__.endswith("mamba") else "transformer")
    params = jit(model.init, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
    return perturb_norms(params, model.param_axes(cfg), seed)


def tokens(vocab_size: int, b: int = 2, s: int = 12, seed: int = 1) -> jax.Array:
    """Random int32 tokens [b, s] in [0, vocab_size)."""
    return jax.random.randint(jax.random.PRNGKey(seed), (b, s), 0, vocab_size)


def tiny_train_config(**train):
    """The default experiment (arith_cot) at a tiny size: 8 steps of batch 8 x 64 on 1-3-step problems,
    float32 compute, no evaluations, checkpoints every 2 steps; ``train`` overrides ``config.train``."""
    from experiments import arith_cot

    c = arith_cot.get_config()
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, dtype="float32")
    c.data.max_steps = 3
    c.train.update({**dict(steps=8, batch_size=8, seq_len=64, log_every=1, eval_every=0, exact_match_every=0,
                           ckpt_every=2, progress=False), **train})
    c.optim.warmup_steps = 2
    return c
