"""Mamba LM (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

A stack of residual blocks ``x_{l+1} = x_l + Mixer(RMSNorm(x_l))``, final RMSNorm, tied
embeddings by default. With E = expand * d_model channels, N = d_state and R = dt_rank,
one mixer maps u [batch, seq, d_model] to [batch, seq, d_model]:

    x, z      = u W_x, u W_z                                   in_proj   [seq, E] each
    x         = silu(causal depthwise conv1d(x))               d_conv taps per channel
    dt, B, C  = split(x W_xproj, [R, N, N])                    selective (input-dependent)
    dt        = softplus(dt W_dt + b_dt)                        [seq, E]
    A         = -exp(A_log)                                     [E, N], S4D-real init A_log = log(1..N)
    h_t       = exp(dt_t A) * h_{t-1} + dt_t B_t x_t            ZOH for A, Euler for B; h_t [E, N] float32
    y_t       = C_t h_t + D * x_t
    out       = (y * silu(z)) W_out

The selective scan (``selective_scan``) has a sequential ``reference`` (``lax.scan`` over
time), a ``chunked`` fast path: an associative scan on (decay, input) pairs within chunks
of ``chunk_size`` steps, the state carried across chunks by an outer ``lax.scan``, each chunk
under ``jax.checkpoint`` so that only one chunk's [batch, chunk, E, N] tensors exist at once,
forward or backward; and ``pallas``: fused GPU kernels, forward and backward, that keep the
state in registers (``models/scan_kernel.py``; interpreted, slowly, off GPU). XLA cannot
partition the kernels, so under an active mesh they run in ``shard_map`` on each device's
[batch / data, seq, E / tensor] block (rows and channels are independent).

The segment bookkeeping, the conv and the gated output are ``models/mamba_ops.py``'s; without a cache
(training, evaluation) the conv with its silu and the gate are ``conv_silu`` and ``gate``, whose own
backward passes keep their [batch, seq, E] gradients in the compute dtype.

Packed sequences: ``segment_ids`` [batch, seq] (0 = padding). The first token of a new
segment resets the state (decay 0) and the convolution never mixes tokens of different
segments. A padding token does not advance the SSM state (dt = 0) and is a zero input to the
convolution, so padding with nothing real before it (generation's left padding) is exactly
no token at all; padding after real tokens reaches the next ones' convolution as zeros.
Decoding carries the conv buffer and the SSM state (``init_cache``): O(1) per token. ``decode_params``
gives per-layer weights that run in a Python loop, each layer replacing its slot of the stacked
cache in place; a one-token step's state update is then one fused kernel (``step_kernel``: h read
and written once) when ``use_step_kernel(cfg)`` (``model.decode="pallas"``, or the default "auto" on a GPU: 1.37x
the XLA step at batch 64 on an H200), and a prompt's dt and conv are one kernel each (the prefill of
64 x 2048 tokens 1.1x faster). With ``scan="pallas"``, training's dt is one kernel too (``dt_kernel``).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import capture, dt_kernel, layers, step_kernel
from models.layers import REMAT_POLICIES
from models.mamba_ops import causal_conv, conv_silu, conv_window, gate, segment_info
from models.ssm_scan import SCANS, selective_scan  # noqa: F401 (selective_scan: mamba's own, public here too)
from parallel import sharding
from parallel.sharding import constrain

DECODES = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Config:
    """Mamba hyperparameters; hashable so it can be a static jit argument."""

    vocab_size: int = 259
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 16  # N
    d_conv: int = 4  # taps of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int = 0  # 0: ceil(d_model / 16)
    dt_min: float = 0.001  # softplus(dt bias) at init is log-uniform in [dt_min, dt_max] ...
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # ... and at least this
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    proj_bias: bool = False  # biases of in_proj and out_proj (Hugging Face use_bias)
    conv_bias: bool = True  # (Hugging Face use_conv_bias)
    dtype: str = "bfloat16"  # compute dtype; the scan computes its state in float32
    param_dtype: str = "float32"
    state_dtype: str = "float32"  # the cached recurrent state between tokens (``init_cache``); "bfloat16" halves the
    # decoding step's state traffic, as the bf16 caches of Hugging Face and state-spaces/mamba keep it
    remat: str = "full"
    layer_unroll: int = 1  # layers per iteration of the layer scan; 0: all (``layers.layer_scan``: compiles longer)
    scan: str = "chunked"  # or "reference" (sequential), "pallas" (GPU kernels: the scan and dt)
    chunk_size: int = 64  # of the chunked scan
    scan_splits: int = 0  # pallas: pieces each sequence is cut into (scan_kernel seq_splits); 0: auto, 1: none
    decode: str = "auto"  # cached steps and prompts: "xla", "pallas" (step_kernel), or "auto" (pallas on GPU)

    def __post_init__(self):
        if self.dt_rank == 0 and isinstance(self.d_model, int) and self.d_model > 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        validate(self)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def compute_dtype(self):
        return layers.DTYPES[self.dtype]


def validate(cfg: Config) -> None:
    """Raise ValueError with one sentence naming the field and the fix."""
    for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand", "dt_rank", "chunk_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"model.{name} is {value!r}; set it to a positive integer.")
    layers.check_layer_unroll(cfg.layer_unroll)
    if isinstance(cfg.scan_splits, bool) or not isinstance(cfg.scan_splits, (int, np.integer)) or cfg.scan_splits < 0:
        raise ValueError(f"model.scan_splits is {cfg.scan_splits!r}; set it to 0 (auto), 1 (no split) or the "
                         "number of pieces each sequence's scan is cut into.")
    for name in ("dt_min", "dt_max", "dt_init_floor", "norm_eps"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"model.{name} is {value!r}; set it to a finite number.")
    if not 0 < cfg.dt_min <= cfg.dt_max:
        raise ValueError(f"model.dt_min ({cfg.dt_min}) and model.dt_max ({cfg.dt_max}) must satisfy "
                         "0 < dt_min <= dt_max; the defaults are 0.001 and 0.1.")
    if not 0 <= cfg.dt_init_floor <= cfg.dt_max:
        raise ValueError(f"model.dt_init_floor is {cfg.dt_init_floor}; use a value in [0, dt_max={cfg.dt_max}] "
                         "(default 1e-4).")
    if cfg.norm_eps <= 0:
        raise ValueError(f"model.norm_eps is {cfg.norm_eps}; set it to a positive number.")
    for name, choices in (("dtype", layers.DTYPES), ("param_dtype", layers.DTYPES), ("state_dtype", layers.DTYPES),
                          ("remat", REMAT_POLICIES), ("scan", SCANS), ("decode", DECODES)):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"model.{name} is {getattr(cfg, name)!r}; use one of {sorted(choices)}.")


def from_config(model_cfg) -> Config:
    """Config from a mapping (the ``model`` section of an experiment config); unknown keys are refused."""
    return models.config_from(Config, model_cfg, "Mamba")


# ----------------------------------------------------------------------------- parameters

def init(cfg: Config, rng: jax.Array) -> dict:
    """Parameters, stacked over a leading ``layers`` axis (projections [layers, in, out]).

    Projections N(0, 1/fan_in), out_proj further / sqrt(n_layers) (the paper's prenorm residual
    rescaling); conv taps U(+-1/sqrt(d_conv)), conv bias 0; dt_proj U(+-1/sqrt(dt_rank)); dt bias
    = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at dt_init_floor;
    A_log[e, n] = log(n + 1) (S4D-real); D = 1; norms 1.
    """
    pd = layers.DTYPES[cfg.param_dtype]
    L, D, E, N, R, K, V = (cfg.n_layers, cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv,
                           cfg.vocab_size)
    keys = iter(jax.random.split(rng, 9))
    uniform = lambda k, shape, bound: jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(pd)  # noqa: E731
    block = {
        "norm": jnp.ones((L, D), pd),
        "in_x": layers.normal_init(next(keys), (L, D, E), D, pd),
        "in_z": layers.normal_init(next(keys), (L, D, E), D, pd),
        "conv_w": uniform(next(keys), (L, K, E), K ** -0.5),
        "x_proj": layers.normal_init(next(keys), (L, E, R + 2 * N), E, pd),
        "dt_proj": uniform(next(keys), (L, R, E), R ** -0.5),
        "dt_bias": dt_bias_init(next(keys), (L, E), cfg.dt_min, cfg.dt_max, cfg.dt_init_floor).astype(pd),
        "A_log": jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=jnp.float32)), (L, E, N)).astype(pd),
        "D": jnp.ones((L, E), pd),
        "out_proj": (layers.normal_init(next(keys), (L, E, D), E, jnp.float32) / math.sqrt(L)).astype(pd),
    }
    if cfg.conv_bias:
        block["conv_b"] = jnp.zeros((L, E), pd)
    if cfg.proj_bias:
        block.update(in_x_bias=jnp.zeros((L, E), pd), in_z_bias=jnp.zeros((L, E), pd),
                     out_bias=jnp.zeros((L, D), pd))
    # Tied tables also serve as the output projection, so keep their logits O(1).
    params = {"embed": layers.normal_init(next(keys), (V, D), D if cfg.tie_embeddings else 1, pd),
              "layers": block, "final_norm": jnp.ones((D,), pd)}
    if not cfg.tie_embeddings:
        params["head"] = layers.normal_init(next(keys), (D, V), D, pd)
    return params


def dt_bias_init(rng, shape, dt_min: float, dt_max: float, floor: float) -> jax.Array:
    """float32 softplus^-1(dt) = dt + log(1 - exp(-dt)), dt = max(exp(U(log dt_min, log dt_max)), floor)."""
    log_dt = jax.random.uniform(rng, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def param_axes(cfg: Config) -> dict:
    """Logical axis names for every parameter, same structure as ``init``; ``inner`` is d_inner, ``state`` d_state."""
    block = {
        "norm": ("layers", "norm"),
        "in_x": ("layers", "embed", "inner"), "in_z": ("layers", "embed", "inner"),
        "conv_w": ("layers", None, "inner"),
        "x_proj": ("layers", "inner", None),
        "dt_proj": ("layers", None, "inner"), "dt_bias": ("layers", "inner"),
        "A_log": ("layers", "inner", "state"), "D": ("layers", "inner"),
        "out_proj": ("layers", "inner", "embed"),
    }
    if cfg.conv_bias:
        block["conv_b"] = ("layers", "inner")
    if cfg.proj_bias:
        block.update(in_x_bias=("layers", "inner"), in_z_bias=("layers", "inner"), out_bias=("layers", "embed"))
    axes = {"embed": ("vocab", "embed"), "layers": block, "final_norm": ("norm",)}
    if not cfg.tie_embeddings:
        axes["head"] = ("embed", "vocab")
    return axes


def axis_sizes(cfg: Config) -> dict:
    """{logical axis: (size, config field)} of the activation axes a mesh must divide."""
    return {"inner": (cfg.d_inner, "d_inner"), "state": (cfg.d_state, "d_state"), "embed": (cfg.d_model, "d_model"),
            "vocab": (cfg.vocab_size, "vocab_size")}


def validate_mesh(cfg: Config, mesh, rules, *, tokens: int | None = None) -> None:
    """Nothing to check beyond ``axis_sizes``: every Mamba layer splits like any other."""
    del cfg, mesh, rules, tokens


def decode_params(params: dict, cfg: Config, fuse: bool = True, batch: int | None = None) -> dict:
    """``params`` with ``layers`` as a tuple of per-layer dicts, for cached decoding.

    ``models.generate`` calls this once, outside its decode loop, so each step reads every weight
    where it lies instead of slicing it out of the stacked array again (a copy of each weight per
    layer and step). Each layer's A = -exp(A_log) [E, N] float32 is computed here once (``A``
    replaces ``A_log``), and with ``fuse`` dense in_x and in_z become one ``in_xz`` [d_model, 2E]
    (one wider matmul per step). Weights of a ``weights.Weight`` type stay as they are. The layout does not
    depend on ``batch`` (the rows decoded).
    """
    del cfg, batch
    stack = params["layers"]
    units = jax.tree.leaves(stack)[0].shape[0]
    per_layer = []
    for i in range(units):
        p = dict(jax.tree.map(lambda a, i=i: a[i], stack))
        if isinstance(p["A_log"], jax.Array):
            p["A"] = -jnp.exp(p.pop("A_log").astype(jnp.float32))
        if fuse and all(isinstance(p[n], jax.Array) for n in ("in_x", "in_z")):
            p["in_xz"] = jnp.concatenate([p.pop("in_x"), p.pop("in_z")], axis=1)
        per_layer.append(p)
    return {**params, "layers": tuple(per_layer)}


def layers_per_unit(cfg: Config) -> int:
    """Layers in one unit of the stack: always 1."""
    return 1


def matmul_params(cfg: Config) -> int:
    """Parameters that take part in a matmul per token: in/x/dt/out projections and the LM head."""
    E, R, N = cfg.d_inner, cfg.dt_rank, cfg.d_state
    per_layer = 2 * cfg.d_model * E + E * (R + 2 * N) + R * E + E * cfg.d_model
    return cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: Config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + the conv and the scan (forward x 3 for fwd+bwd).

    Per layer and token the conv costs 2 d_conv E FLOPs and the recurrence about 9 E N (exp(dt A),
    dt B x, the state update, C h): independent of ``seq_len``, unlike attention.
    """
    del seq_len
    per_layer = cfg.d_inner * (2 * cfg.d_conv + 9 * cfg.d_state)
    return 6.0 * matmul_params(cfg) + 3.0 * cfg.n_layers * per_layer


# ----------------------------------------------------------------------------- forward

def embed(params: dict, tokens: jax.Array, cfg: Config) -> jax.Array:
    """tokens [batch, seq] int -> hidden [batch, seq, d_model] in the compute dtype."""
    return layers.embed(params, tokens, cfg.compute_dtype)


def _bias(p, name, y):
    return y if name not in p else y + p[name].astype(y.dtype)


def block(p: dict, x: jax.Array, cfg: Config, *, positions=None, segment_ids=None, cache=None, train: bool = False,
          rng=None):
    """One residual layer x + Mixer(RMSNorm(x)). p: one layer's slice of ``params['layers']``; x [b, s, d_model].

    segment_ids [b, s] (0 = padding; None: each row one sequence); cache: None, or this layer's
    state from earlier tokens {'conv': [b, d_conv-1, E], 'ssm': [b, E, N] (float32 by default), 'segment': [b]
    their last non-padding segment id}. ``positions``, ``train`` and ``rng`` are the protocol's
    (Mamba needs no positions and has no dropout). Returns (x, new cache or None, aux {}).
    """
    x, state = _layer(p, x, cfg, segment_ids=segment_ids, last_segment=None if cache is None else cache["segment"],
                      state=None if cache is None else {"conv": cache["conv"], "ssm": cache["ssm"]})
    if cache is None:
        return x, None, {"losses": {}, "metrics": {}}
    if segment_ids is None:
        segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    return x, {**state, "segment": segment_info(segment_ids, cache["segment"])[3]}, {"losses": {}, "metrics": {}}


def _layer(p: dict, x: jax.Array, cfg: Config, *, segment_ids=None, last_segment=None, state=None, layer=None):
    """``block``'s math: (x, new {'conv', 'ssm'} state or None).

    ``layer`` (an int): ``state`` holds every layer's state ([layers, ...], ``init_cache``'s) and this
    layer reads and replaces its own, in place; a one-token call then takes the fused step kernel
    when ``use_step_kernel(cfg)``.
    """
    dt_type = cfg.compute_dtype
    R, N = cfg.dt_rank, cfg.d_state
    if segment_ids is None and state is not None:
        segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    start = nonpad = run = None
    if segment_ids is not None:
        start, nonpad, run, _ = segment_info(segment_ids, last_segment)
    names = ("batch", "seq", "inner")
    n = layers.rms_norm(x, p["norm"], cfg.norm_eps)
    xz = None
    if "in_xz" in p:  # the fused decoding layout of ``decode_params``
        xz = layers.linear(p["in_xz"], n, name="in_xz")
        xi, z = jnp.split(xz, 2, axis=-1)
        xi, z = _bias(p, "in_x_bias", xi), _bias(p, "in_z_bias", z)
    else:
        xi = _bias(p, "in_x_bias", layers.linear(p["in_x"], n, name="in_x"))
        z = _bias(p, "in_z_bias", layers.linear(p["in_z"], n, name="in_z"))
    xi, z = constrain(xi, names), constrain(z, names)
    x_in = xi  # padding not yet zeroed (the prompt's conv kernel masks it itself)
    if nonpad is not None:
        xi = jnp.where(nonpad[..., None], xi, 0)
    kernel = layer is not None and x.shape[1] == 1 and use_step_kernel(cfg) and isinstance(p["dt_proj"], jax.Array)
    conv_state = ssm_state = None
    if state is not None and not kernel:
        conv_state, ssm_state = (state[k] if layer is None else state[k][layer] for k in ("conv", "ssm"))
    if kernel:  # one token: the conv and its silu in one kernel, the window shifted in place
        keep, live = 1.0 - start[:, 0].astype(jnp.float32), nonpad[:, 0].astype(jnp.float32)
        if xz is not None and "in_x_bias" not in p and xz.dtype == state["conv"].dtype and not sharding.active():
            xi = z = xz  # both kernels read their half of in_xz's output where it lies (unsharded)
        xc, conv_buffer = _kernel_call(step_kernel.conv_step, "conv", state["conv"], layer,
                                       xi[:, 0].astype(state["conv"].dtype), p["conv_w"], p.get("conv_b"), keep, live)
        xc = constrain(xc[:, None].astype(dt_type), names)
    elif state is None:  # no cache: the conv with its own backward
        xc, conv_buffer = constrain(conv_silu(xi, p["conv_w"], p.get("conv_b"), run), names), None
    elif x.shape[1] > 1 and use_step_kernel(cfg) and step_kernel.prefill_conv_takes(x.shape[1], xi.shape[-1]):
        # a prompt: the conv and its silu in one kernel (x read from in_xz's output when that holds it alone)
        src = xz if xz is not None and "in_x_bias" not in p else x_in
        xc = step_kernel.prefill_conv(src, p["conv_w"], p.get("conv_b"), run, nonpad, conv_state)
        xc, conv_buffer = constrain(xc.astype(dt_type), names), conv_window(xi, conv_state, run)
    else:
        xc, conv_buffer = causal_conv(xi, p["conv_w"], p.get("conv_b"), run=run, buffer=conv_state)
        xc = constrain(jax.nn.silu(xc).astype(dt_type), names)
    dbc = layers.linear(p["x_proj"], xc, name="x_proj")  # [b, s, R + 2N]
    A = p["A"] if "A" in p else -jnp.exp(p["A_log"].astype(jnp.float32))
    if kernel:
        y, ssm = _kernel_call(step_kernel.selective_step, "ssm", state["ssm"], layer, xc[:, 0], z[:, 0],
                              dbc[:, 0], p["dt_proj"], p["dt_bias"], A, p["D"], keep, live)
        y = constrain(y[:, None], names)
    else:
        B, C = dbc[..., R:R + N], dbc[..., R + N:]
        dt = constrain(_dt(p, dbc, nonpad, cfg, prompt=state is not None), names)
        h0 = None if ssm_state is None else ssm_state.astype(jnp.float32)
        y, h = selective_scan(xc, dt, A, B, C, None, reset=start, h0=h0, method=cfg.scan,
                              chunk_size=cfg.chunk_size, splits=cfg.scan_splits, y_dtype=dt_type)
        y = constrain(gate(y, xc, z.astype(dt_type), p["D"]), names)
        ssm = None if state is None else constrain(h.astype(state["ssm"].dtype), ("batch", "inner", "state"))
        if layer is not None:
            ssm = state["ssm"].at[layer].set(ssm)
    x = x + _bias(p, "out_bias", layers.linear(p["out_proj"], y, name="out_proj"))
    new_state = None
    if state is not None:
        if not kernel:
            conv_buffer = conv_buffer.astype(state["conv"].dtype)
            conv_buffer = conv_buffer if layer is None else state["conv"].at[layer].set(conv_buffer)
        new_state = {"conv": conv_buffer, "ssm": ssm}
    return constrain(x, ("batch", "seq", "embed")), new_state


def _dt(p: dict, dbc: jax.Array, nonpad, cfg: Config, prompt: bool) -> jax.Array:
    """dt = softplus(dt_low W_dt + dt_bias) [b, s, E] in the compute dtype, 0 where nonpad [b, s] is False (padding:
    decay 1, no input); dbc [b, s, R + 2N] is x_proj's output. With the Pallas scan, or for a cached prompt
    (``prompt``) when ``use_step_kernel(cfg)``, ``dt_kernel.dt`` where it takes each device's shapes: the product and
    softplus in one kernel, with its own backward (not under ``capture``, which records dt_proj's input)."""
    R, E = cfg.dt_rank, p["dt_bias"].shape[-1]
    if ((cfg.scan == "pallas" or (prompt and use_step_kernel(cfg))) and isinstance(p["dt_proj"], jax.Array)
            and not capture.active()
            and dt_kernel.takes(dbc.shape[1] // sharding.logical_size("seq"), R, E // sharding.logical_size("inner"))):
        return dt_kernel.dt(dbc, p["dt_proj"], p["dt_bias"], nonpad, cfg.compute_dtype)
    dt_raw = layers.linear(p["dt_proj"], dbc[..., :R], name="dt_proj")
    # softplus in float32, stored in the compute dtype (as the scan's other inputs; it computes in float32)
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32)).astype(cfg.compute_dtype)
    return dt if nonpad is None else jnp.where(nonpad[..., None], dt, 0)


def use_step_kernel(cfg: Config) -> bool:
    """Whether cached calls (one-token steps, prompts) take ``step_kernel`` (``cfg.decode``; "auto": on a GPU without an
    active mesh, when dt_rank and d_state are powers of 2, as Triton's blocks must be)."""
    if cfg.decode == "auto":
        pow2 = all(v & (v - 1) == 0 for v in (cfg.dt_rank, cfg.d_state))
        return jax.default_backend() == "gpu" and sharding.active() is None and pow2
    return cfg.decode == "pallas"


def _kernel_call(fn, kind, state, layer, *args):
    """``fn(state, layer, *args)`` for ``step_kernel``'s conv_step (kind "conv": args x [b, E], w [K, E],
    bias [E] or None, keep, live [b]) or selective_step (kind "ssm": x, z [b, E], dbc [b, R + 2N],
    dt_proj [R, E], dt_bias [E], A [E, N], D [E], keep, live [b]); under an active mesh in ``shard_map``
    over rows and channels (by the rules for ``batch`` and ``inner``; the state's ``layers`` axis whole
    on each device)."""
    def run(state, *args):
        return fn(state, layer, *args)

    rows_inner, inner, rows = ("batch", "inner"), ("inner",), ("batch",)
    if kind == "conv":  # (a bias of None is an empty pytree: its names are not used)
        state_names = (None, "batch", None, "inner")
        in_names = (state_names, rows_inner, (None, "inner"), inner, rows, rows)
    else:
        state_names = (None, "batch", "inner", "state")
        in_names = (state_names, rows_inner, rows_inner, ("batch", None), (None, "inner"), inner, ("inner", "state"),
                    inner, rows, rows)
    return sharding.per_device(run, in_names, (rows_inner, state_names))(state, *args)


def blocks(layer_params: dict, x: jax.Array, cfg: Config, *, positions=None, segment_ids=None, cache=None,
           train: bool = False, rng=None, layer_ids=None):
    """The layers on ``layer_params``' leading ``layers`` axis via ``lax.scan`` (rematerialised per ``cfg.remat``).

    ``train`` and ``rng`` are the protocol's mode arguments (Mamba has no dropout); layer_ids
    [layers] the global layer ids (default 0..layers-1; they name the ``capture`` taps). With
    ``cache`` (``init_cache`` for these layers) each layer starts from its cached conv buffer and
    SSM state and the new ones are returned: (x, new cache without 'index', aux); else (x, None,
    aux). aux: {'losses': {}, 'metrics': {}}. When ``layer_params`` is a tuple of per-layer dicts
    (``decode_params``: no weight is sliced out of a stacked array inside a decoding step), and
    under ``capture`` (the stack is split first), the layers run in a Python loop, each reading and
    replacing its slot of the stacked cache in place (a one-token step through ``step_kernel`` when
    ``use_step_kernel(cfg)``).
    """
    del positions, train, rng
    last = None
    if cache is not None:
        if segment_ids is None:
            segment_ids = jnp.ones(x.shape[:2], jnp.int32)
        last = cache["segment"]
    states = None if cache is None else {"conv": cache["conv"], "ssm": cache["ssm"]}
    aux = {"losses": {}, "metrics": {}}
    if capture.active() and not isinstance(layer_params, (list, tuple)):
        units = jax.tree.leaves(layer_params)[0].shape[0]
        layer_params = tuple(jax.tree.map(lambda a, i=i: a[i], layer_params) for i in range(units))
    if isinstance(layer_params, (list, tuple)):  # per-layer weights (``decode_params``, capture): a Python loop
        ids = np.arange(len(layer_params)) if layer_ids is None else np.asarray(layer_ids).reshape(-1)
        for i, p in enumerate(layer_params):
            capture.hidden(int(ids[i]), x)
            with capture.layer(int(ids[i])):
                x, states = _layer(p, x, cfg, segment_ids=segment_ids, last_segment=last, state=states,
                                   layer=None if states is None else i)
        capture.hidden(int(ids[-1]) + 1, x)
    else:
        def body(h, xs):
            p, state = xs
            return _layer(p, h, cfg, segment_ids=segment_ids, last_segment=last, state=state)

        if cache is None:
            body = layers.remat(body, cfg.remat, cfg.layer_unroll)
        x, states = layers.layer_scan(body, x, (layer_params, states), cfg.layer_unroll)
    if cache is None:
        return x, None, aux
    return x, {**cache, **states, "segment": segment_info(segment_ids, last)[3]}, aux


def head(params: dict, x: jax.Array, cfg: Config) -> jax.Array:
    """Final RMSNorm and LM head (tied to the embedding by default): float32 logits [batch, seq, vocab]."""
    return layers.lm_head(params, x, cfg.norm_eps, cfg.tie_embeddings)


def init_cache(cfg: Config, batch: int, max_len: int = 0, dtype=None) -> dict:
    """Empty recurrent state (``max_len`` is unused: the state is O(1) in the length).

    conv [n_layers, batch, d_conv-1, d_inner] (compute dtype): the last inputs of each conv;
    ssm [n_layers, batch, d_inner, d_state] (``cfg.state_dtype``); segment [batch] int32: the last
    non-padding segment id seen (0: none); index: tokens consumed so far.
    """
    del max_len
    E = cfg.d_inner
    return {"conv": jnp.zeros((cfg.n_layers, batch, cfg.d_conv - 1, E), dtype or cfg.compute_dtype),
            "ssm": jnp.zeros((cfg.n_layers, batch, E, cfg.d_state), layers.DTYPES[cfg.state_dtype]),
            "segment": jnp.zeros((batch,), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def cache_axes(cfg: Config) -> dict:
    """Logical axis names of ``init_cache``'s arrays."""
    del cfg
    return {"conv": ("layers", "batch", None, "inner"), "ssm": ("layers", "batch", "inner", "state"),
            "segment": ("batch",), "index": ()}


def apply(params: dict, tokens: jax.Array, cfg: Config, *, positions=None, segment_ids=None, cache=None,
          train: bool = False, rng=None, last_only: bool = False):
    """tokens [batch, seq] -> (float32 logits [batch, seq, vocab], aux).

    segment_ids [batch, seq] (0 = padding) keep packed sequences apart; ``positions`` is
    ignored (recurrence needs none). With ``cache`` the tokens continue the cached state (a
    multi-token prefill or one-token steps alike) and ``aux['cache']`` is the advanced cache;
    padding tokens leave a row's state unchanged. ``last_only``: logits of the last position only,
    [batch, 1, vocab] (a prefill needs no more).
    """
    del positions
    x = embed(params, tokens, cfg)
    x, new_cache, aux = blocks(params["layers"], x, cfg, segment_ids=segment_ids, cache=cache, train=train, rng=rng)
    if new_cache is not None:
        aux["cache"] = {**new_cache, "index": cache["index"] + tokens.shape[1]}
    return head(params, x[:, -1:] if last_only else x, cfg), aux
