"""Llama-style decoder-only Transformer LM as pure functions over a parameter pytree.

Vaswani et al. 2017 with the Llama (Touvron et al. 2023) choices: pre-norm RMSNorm,
rotary position embeddings, SwiGLU MLP, grouped-query attention, no biases, optional
tied input/output embeddings. For one layer l with input x_l [batch, seq, d_model]:

    h   = x_l + W_o Attention(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(x_l)
    x_{l+1} = h + SwiGLU(RMSNorm(h))

Layers are stacked on a leading ``layers`` axis and run with ``lax.scan`` under
``jax.checkpoint`` with a named remat policy. Parameters are float32; compute runs in
``cfg.dtype`` (bfloat16 by default) with float32 norms, softmax and logits.

Switch Transformer (Fedus et al. 2021) as a configuration of this family: with
``num_experts`` > 0, every ``moe_every``-th layer (layers moe_every-1, 2 moe_every-1, ...,
0-based) replaces SwiGLU(RMSNorm(h)) by the Switch layer of ``models/moe.py`` on the same
normed input, with the same residual add. ``n_layers`` must be a multiple of ``moe_every``.

One uniform layer stack: ``params['layers']`` stacks repeating *units* on its leading ``layers``
axis. Dense: a unit is one layer. Switch: a unit is ``moe_every`` layers,
``{'dense': {...}, 'moe': {...}}``: ``dense`` the moe_every-1 dense layers before the MoE layer,
leaves [U, moe_every-1, ...] (inner logical axis ``sublayers``; absent when moe_every == 1), and
``moe`` the MoE layer's attention weights and norms plus ``router`` [U, d_model, N] and expert
weights w_gate, w_up [U, N, d_model, d_ff], w_down [U, N, d_ff, d_model]. ``blocks`` runs any
number of units (a pipeline stage's slice) under ``lax.scan``, with their global unit ids
``layer_ids``. Training mode (``train=True``: the training capacity factor, expert dropout keyed
by ``fold_in(rng, global index of the unit's MoE layer)``) is the train step's; everything else
runs in evaluation mode, and cached decoding always takes the dropless path, so it equals the
full forward with ``moe_dispatch='dropless'``. With ``num_experts == 0`` (the default) the model,
its parameters and its checkpoints are exactly the dense ones.

aux (every family): ``aux['losses']`` {name: float32 scalar, already weighted, per token}: with
Switch layers "moe/loss" = sum over MoE layers of aux_loss + z_loss; ``aux['metrics']``
{"moe/<metric>/layer<i>": float32 scalar} for every metric of ``moe.apply``, i the global layer
index; ``aux['cache']`` when decoding.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

import models
from models import capture, decode_layer, layers, moe, weights
from models.attention import IMPLEMENTATIONS, attention
from models.layers import REMAT_POLICIES
from parallel import ring_attention
from parallel.sharding import constrain

DECODES = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Config:
    """Transformer hyperparameters; hashable so it can be a static jit argument."""

    vocab_size: int = 259
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 384
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "full"
    layer_unroll: int = 1  # layers per iteration of the layer scan; 0: all (``layers.layer_scan``: compiles longer)
    attention: str = "auto"
    # cached batch-1 steps: "xla" (the layer op by op), "pallas" (six kernels a layer, ``models/decode_layer.py``, where
    # the shapes allow; in the interpreter off a GPU; under an active mesh unsplit, each device running the whole
    # layer), or "auto" (pallas on a GPU without an active mesh)
    decode: str = "auto"
    ring_layout: str = "zigzag"  # attention='ring': 'zigzag' (causal load balance) or 'contiguous' (in order)
    # Switch mixture of experts (models/moe.py); num_experts 0 = dense. See ``moe.MoEConfig``.
    num_experts: int = 0  # N experts per MoE layer
    moe_every: int = 2  # every moe_every-th layer is MoE (1: all; 2: every other, as in Switch)
    moe_top_k: int = 1  # experts per token (Switch: 1)
    moe_capacity_factor_train: float = 1.25
    moe_capacity_factor_eval: float = 2.0
    moe_group_size: int = 1024  # tokens per routing group; must divide (micro)batch x seq on the capacity path
    moe_dispatch: str = "capacity"  # 'capacity' | 'dropless' (cached decoding is always dropless)
    moe_aux_loss_coef: float = 0.01  # alpha of the load-balancing loss
    moe_z_loss_coef: float = 1e-3  # router z-loss coefficient
    moe_expert_dropout: float = 0.0  # dropout inside the experts, training only
    moe_init_scale: float = 0.1  # truncated-normal init std sqrt(scale / fan_in) of the experts
    moe_router_init_scale: float = 0.1  # ... and of the router
    moe_normalize_gates: bool = False  # renormalise top-k gates to sum 1 (top_k > 1 only)

    def __post_init__(self):
        if self.head_dim == 0 and isinstance(self.n_heads, int) and self.n_heads > 0:
            derived = self.d_model // self.n_heads if isinstance(self.d_model, int) else 0
            if isinstance(self.d_model, int) and self.d_model > 0 and (derived < 2 or derived % 2):
                multiple = 2 * self.n_heads
                # head_dim was not set: name the fields that were (d_model, n_heads), not head_dim.
                raise ValueError(f"model.d_model ({self.d_model}) / model.n_heads ({self.n_heads}) gives a head "
                                 f"dimension of {derived}, but rotary embeddings need an even one >= 2; make "
                                 f"d_model a multiple of 2 * n_heads (e.g. {-(-self.d_model // multiple) * multiple}), "
                                 f"lower n_heads, or set model.head_dim.")
            object.__setattr__(self, "head_dim", derived)
        validate(self)

    @property
    def compute_dtype(self):
        return layers.DTYPES[self.dtype]

    @property
    def moe(self) -> moe.MoEConfig | None:
        """The Switch layer config built from the ``moe_*`` fields, or None for the dense model."""
        if not self.num_experts:
            return None
        return moe.MoEConfig(**{name: getattr(self, field) for name, field in _MOE_FIELDS.items()})


# MoEConfig field -> Config field: ``num_experts`` as is, every other one with a ``moe_`` prefix.
_MOE_FIELDS = {f.name: f.name if f.name == "num_experts" else f"moe_{f.name}"
               for f in dataclasses.fields(moe.MoEConfig)}


def _model_fields(message: str) -> str:
    """Rewrite ``moe.<field>`` in a ``models.moe`` error as the ``model.<field>`` a config sets."""
    return re.sub(r"\bmoe\.(\w+)", lambda m: f"model.{_MOE_FIELDS.get(m.group(1), m.group(1))}", message)


def validate(cfg: Config) -> None:
    """Raise ValueError with one sentence naming the field and the fix."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.{name} is {getattr(cfg, name)}; set it to a positive integer.")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"model.n_heads ({cfg.n_heads}) must be a multiple of model.n_kv_heads ({cfg.n_kv_heads}); "
            "choose n_kv_heads among the divisors of n_heads."
        )
    if cfg.head_dim % 2:
        raise ValueError(f"model.head_dim ({cfg.head_dim}) must be even for rotary embeddings.")
    layers.check_layer_unroll(cfg.layer_unroll)
    for name, choices in (("dtype", layers.DTYPES), ("param_dtype", layers.DTYPES),
                          ("remat", REMAT_POLICIES), ("attention", IMPLEMENTATIONS), ("decode", DECODES)):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"model.{name} is {getattr(cfg, name)!r}; use one of {sorted(choices)}.")
    if cfg.ring_layout not in ring_attention.LAYOUTS:
        raise ValueError(f"model.ring_layout is {cfg.ring_layout!r}; use one of {list(ring_attention.LAYOUTS)}.")
    if cfg.rope_theta <= 0 or cfg.norm_eps <= 0:
        raise ValueError("model.rope_theta and model.norm_eps must be positive.")
    if isinstance(cfg.num_experts, bool) or not isinstance(cfg.num_experts, int) or cfg.num_experts < 0:
        raise ValueError(f"model.num_experts is {cfg.num_experts!r}; use 0 for the dense model or a positive "
                         f"number of experts.")
    if cfg.num_experts:
        try:
            moe_cfg = cfg.moe
        except ValueError as e:
            raise ValueError(_model_fields(str(e))) from None
        if not moe.moe_layers(moe_cfg, cfg.n_layers):
            raise ValueError(f"model.moe_every ({cfg.moe_every}) exceeds model.n_layers ({cfg.n_layers}), so no "
                             f"layer would be MoE; set moe_every <= n_layers or num_experts=0.")
        if cfg.n_layers % cfg.moe_every:
            raise ValueError(f"model.n_layers ({cfg.n_layers}) is not a multiple of model.moe_every "
                             f"({cfg.moe_every}): the layer stack repeats units of moe_every layers (moe_every-1 "
                             f"dense, then one MoE); make n_layers a multiple of moe_every.")


def validate_mesh(cfg: Config, mesh, rules, *, tokens: int | None = None) -> None:
    """``moe.validate_mesh`` for the MoE layers (nothing for the dense model), errors naming ``model.``
    fields; tokens: batch x seq of one forward (a microbatch)."""
    if not cfg.num_experts:
        return
    try:
        moe.validate_mesh(cfg.moe, mesh, rules, tokens=tokens)
    except ValueError as e:
        raise ValueError(_model_fields(str(e))) from None


def from_config(model_cfg) -> Config:
    """Config from a mapping (the ``model`` section of an experiment config); unknown keys are refused."""
    return models.config_from(Config, model_cfg, "Transformer")


# ----------------------------------------------------------------------------- parameters

ATTENTION_WEIGHTS = ("wq", "wk", "wv", "wo")
MLP_WEIGHTS = ("w_gate", "w_up", "w_down")


def moe_layer_ids(cfg: Config) -> tuple[int, ...]:
    """0-based indices of the MoE layers (empty for the dense model)."""
    return moe.moe_layers(cfg.moe, cfg.n_layers) if cfg.num_experts else ()


def layers_per_unit(cfg: Config) -> int:
    """Layers in one unit of the stack: ``moe_every`` with Switch layers, else 1."""
    return cfg.moe_every if cfg.num_experts else 1


def n_units(cfg: Config) -> int:
    """Units on the ``layers`` axis of ``params['layers']``."""
    return cfg.n_layers // layers_per_unit(cfg)


def _stack(cfg: Config, keys, n: int) -> dict:
    """``n`` stacked dense layers: every weight drawn with its key of ``keys``, unit norms."""
    pd = layers.DTYPES[cfg.param_dtype]
    D, F = cfg.d_model, cfg.d_ff
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {
        "wq": (D, q_dim), "wk": (D, kv_dim), "wv": (D, kv_dim), "wo": (q_dim, D),
        "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D),
    }
    block = {name: layers.normal_init(k, (n, *shape), shape[0], pd) for k, (name, shape) in zip(keys, shapes.items())}
    block["attn_norm"] = jnp.ones((n, D), pd)
    block["mlp_norm"] = jnp.ones((n, D), pd)
    return block


def init(cfg: Config, rng: jax.Array) -> dict:
    """Parameters: N(0, 1/fan_in) matrices (2-D, [in, out]; stacked [layers, in, out]), unit norms.

    With MoE the units of the module docstring: attention weights, norms and the dense MLPs are
    those of the dense model with the same ``rng`` (its layers sorted into the units); routers and
    experts come from ``moe.init`` (truncated normal, std sqrt(0.1 / fan_in)).
    """
    pd = layers.DTYPES[cfg.param_dtype]
    D, V = cfg.d_model, cfg.vocab_size
    keys = jax.random.split(rng, len(ATTENTION_WEIGHTS + MLP_WEIGHTS) + 2)
    block = _stack(cfg, keys, cfg.n_layers)
    if cfg.num_experts:
        every, units = cfg.moe_every, n_units(cfg)
        ids = np.asarray(moe_layer_ids(cfg))
        dense_ids = np.asarray([i for i in range(cfg.n_layers) if i not in set(ids.tolist())])
        experts = moe.init(cfg.moe, jax.random.fold_in(rng, 1), D, cfg.d_ff, units, pd)
        block_ = {"moe": {**{k: v[ids] for k, v in block.items() if k not in MLP_WEIGHTS}, **experts}}
        if every > 1:
            block_["dense"] = {k: v[dense_ids].reshape(units, every - 1, *v.shape[1:]) for k, v in block.items()}
        block = block_
    # Tied tables also serve as the output projection, so keep their logits O(1).
    embed_fan_in = D if cfg.tie_embeddings else 1
    params = {
        "embed": layers.normal_init(keys[-2], (V, D), embed_fan_in, pd),
        "layers": block,
        "final_norm": jnp.ones((D,), pd),
    }
    if not cfg.tie_embeddings:
        params["head"] = layers.normal_init(keys[-1], (D, V), D, pd)
    return params


def param_axes(cfg: Config) -> dict:
    """Logical axis names for every parameter, same structure as ``init``."""
    dense = {
        "wq": ("layers", "embed", "heads"), "wk": ("layers", "embed", "kv_heads"),
        "wv": ("layers", "embed", "kv_heads"), "wo": ("layers", "heads", "embed"),
        "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
        "attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
    }
    if cfg.num_experts:
        stacks = {"moe": {**{k: v for k, v in dense.items() if k not in MLP_WEIGHTS}, **moe.param_axes(cfg.moe)}}
        if cfg.moe_every > 1:
            stacks["dense"] = {k: ("layers", "sublayers", *v[1:]) for k, v in dense.items()}
        dense = stacks
    axes = {"embed": ("vocab", "embed"), "layers": dense, "final_norm": ("norm",)}
    if not cfg.tie_embeddings:
        axes["head"] = ("embed", "vocab")
    return axes


def axis_sizes(cfg: Config) -> dict:
    """{logical axis: (size, config field)} of the activation axes a mesh must divide."""
    sizes = {"heads": (cfg.n_heads, "n_heads"), "kv_heads": (cfg.n_kv_heads, "n_kv_heads"),
             "head_dim": (cfg.head_dim, "head_dim"), "mlp": (cfg.d_ff, "d_ff"),
             "vocab": (cfg.vocab_size, "vocab_size"), "embed": (cfg.d_model, "d_model")}
    if cfg.num_experts:
        sizes["experts"] = (cfg.num_experts, "num_experts")
    return sizes


def matmul_params(cfg: Config) -> int:
    """Parameters that take part in a matmul per token: every projection and the LM head.

    With MoE these are the *active* parameters: an MoE layer counts its router (d_model x N)
    and top_k experts' SwiGLU (3 d_model d_ff each), not all N experts. (The capacity path
    also multiplies the empty slots of its buffers; those are not model FLOPs.)
    """
    attn = cfg.d_model * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    mlp = 3 * cfg.d_model * cfg.d_ff
    n_moe = len(moe_layer_ids(cfg))
    moe_mlp = cfg.moe_top_k * mlp + cfg.d_model * cfg.num_experts
    return cfg.n_layers * attn + (cfg.n_layers - n_moe) * mlp + n_moe * moe_mlp + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: Config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + causal attention (QK^T and AV, fwd+bwd).

    Attention costs 2 matmuls x 2 FLOPs x seq x head_dim x heads per token forward, times 3
    for forward+backward, halved because a causal kernel skips the upper triangle. MoE layers
    count through ``matmul_params``: top_k experts and the router per token.
    """
    attn = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params(cfg) + attn


# ----------------------------------------------------------------------------- forward

def embed(params: dict, tokens: jax.Array, cfg: Config) -> jax.Array:
    """tokens [batch, seq] int -> hidden [batch, seq, d_model] in the compute dtype."""
    return layers.embed(params, tokens, cfg.compute_dtype)


def decoder_layer(p: dict, x: jax.Array, cfg: Config, *, positions, segment_ids=None, cache=None, cache_index=0,
                  cache_segment_ids=None, cache_layer=None, train: bool = False, rng=None):
    """One decoder layer. p: one layer's weights (no leading axis); x [batch, seq, d_model].

    With ``cache`` ({'k', 'v'}: [batch, max_len, kv_heads, head_dim]) the new keys and values
    are written at ``cache_index`` and attention reads the whole cache. With ``cache_layer``
    the cache holds several layers ([layers, batch, max_len, ...]) and only this layer's new
    positions are written, in place. A layer whose params hold a ``router`` is a Switch layer:
    ``train`` and ``rng`` (expert dropout) go to ``moe.apply``, and with a cache it runs the
    dropless path. Returns (x, new_cache or None, the MoE layer's ``moe.apply`` aux, {} when dense).
    """
    if cache_layer is not None and decode_layer.takes(p, x, cfg):  # one row: six kernels (models/decode_layer.py)
        return decode_layer.layer(p, x, cfg, positions=positions, segment_ids=segment_ids, cache=cache,
                                  cache_index=cache_index, cache_segment_ids=cache_segment_ids,
                                  cache_layer=cache_layer)
    b, s, _ = x.shape
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    n = layers.rms_norm(x, p["attn_norm"], cfg.norm_eps)
    if "wqkv" in p:  # the fused decoding layout of ``decode_params``
        q, k, v = jnp.split(layers.linear(p["wqkv"], n, name="wqkv"), [q_dim, q_dim + kv_dim], axis=-1)
    else:
        q, k, v = (layers.linear(p[name], n, name=name) for name in ("wq", "wk", "wv"))
    q = q.reshape(b, s, cfg.n_heads, cfg.head_dim)
    k = k.reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
    q = constrain(layers.rope(q, positions, cfg.rope_theta), ("batch", "seq", "heads", "head_dim"))
    k = constrain(layers.rope(k, positions, cfg.rope_theta), ("batch", "seq", "kv_heads", "head_dim"))
    q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
    new_cache = None
    if cache is None:
        o = attention(q, k, v, implementation=cfg.attention, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    else:
        if cache_layer is None:
            new_cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], t.astype(cache[name].dtype),
                                                                   cache_index, axis=1)
                         for name, t in (("k", k), ("v", v))}
        else:
            start = (cache_layer, 0, cache_index, 0, 0)
            new_cache = {name: jax.lax.dynamic_update_slice(cache[name], t[None].astype(cache[name].dtype), start)
                         for name, t in (("k", k), ("v", v))}
        # with cache_layer, attention reads that layer of the stacked cache (sliced, or in place by a kernel)
        o = attention(q, new_cache["k"], new_cache["v"], implementation=cfg.attention, q_segment_ids=segment_ids,
                      kv_segment_ids=cache_segment_ids, q_start=cache_index, kv_layer=cache_layer)
    x = x + layers.linear(p["wo"], o.reshape(b, s, cfg.n_heads * cfg.head_dim), name="wo")
    x = constrain(x, ("batch", "seq", "embed"))
    n = layers.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    if "router" in p:
        mcfg = cfg.moe if cache is None else dataclasses.replace(cfg.moe, dispatch="dropless")
        y, aux = moe.apply({name: p[name] for name in ("router", *moe.EXPERT_WEIGHTS)}, n, mcfg, train=train,
                           rng=rng)
        return constrain(x + y, ("batch", "seq", "embed")), new_cache, aux
    if "w_gate_up" in p:
        gate, up = jnp.split(layers.linear(p["w_gate_up"], n, name="w_gate_up"), [cfg.d_ff], axis=-1)
    else:
        gate, up = layers.linear(p["w_gate"], n, name="w_gate"), layers.linear(p["w_up"], n, name="w_up")
    hidden = jax.nn.silu(gate) * up
    hidden = checkpoint_name(constrain(hidden, ("batch", "seq", "mlp")), "mlp_hidden")
    x = x + layers.linear(p["w_down"], hidden, name="w_down")
    return constrain(x, ("batch", "seq", "embed")), new_cache, {}


def unit_layers(p_unit: dict, cfg: Config) -> list[dict]:
    """The layers of one unit (its weights without the ``layers`` axis), in order."""
    if not cfg.num_experts:
        return [p_unit]
    dense = p_unit.get("dense", {})
    return [jax.tree.map(lambda a, j=j: a[j], dense) for j in range(cfg.moe_every - 1)] + [p_unit["moe"]]


def _ids(layer_ids, units: int, concrete: bool = True):
    """Global unit ids: a NumPy array, or as given (possibly traced: they only key randomness) unless
    ``concrete`` (they name metrics or taps)."""
    if layer_ids is None:
        return np.arange(units)
    if isinstance(layer_ids, jax.core.Tracer):
        if not concrete:
            return layer_ids
        raise ValueError("layer_ids must be concrete (a NumPy array, a tuple or an array made outside jit) with "
                         "Switch layers or under capture: they name the per-layer metrics and taps.")
    ids = np.asarray(layer_ids).reshape(-1)
    if ids.shape[0] != units:
        raise ValueError(f"layer_ids has {ids.shape[0]} entries for {units} units of layer_params.")
    return ids


def standard_aux(moe_aux: dict, layer_index) -> dict:
    """{'losses', 'metrics'} from per-MoE-layer ``moe.apply`` aux (arrays [n]) at global layer indices [n]."""
    if not moe_aux:
        return {"losses": {}, "metrics": {}}
    losses = {"moe/loss": jnp.sum(moe_aux["aux_loss"]) + jnp.sum(moe_aux["z_loss"])}
    metrics = {f"moe/{name}/layer{int(i)}": values[k] for name, values in moe_aux.items()
               for k, i in enumerate(layer_index)}
    return {"losses": losses, "metrics": metrics}


def block(p_unit: dict, x: jax.Array, cfg: Config, *, positions, segment_ids=None, cache=None, cache_index=0,
          cache_segment_ids=None, train: bool = False, rng=None, layer_id: int = 0):
    """One unit of the stack (a layer; with Switch layers moe_every layers) with global unit id ``layer_id``.

    p_unit: the unit's slice of ``params['layers']``. cache: None, or {'k', 'v'} [layers in the unit,
    batch, max_len, kv_heads, head_dim] written at ``cache_index`` (``cache_segment_ids`` [batch,
    max_len]). ``rng`` is the unit's key (``blocks`` passes fold_in(rng, global index of its last
    layer)). Returns (x, new cache or None, aux in the standard form).
    """
    per, moe_aux, kv = layers_per_unit(cfg), {}, cache
    for j, p in enumerate(unit_layers(p_unit, cfg)):
        x, kv, a = decoder_layer(p, x, cfg, positions=positions, segment_ids=segment_ids, cache=kv,
                                 cache_index=cache_index, cache_segment_ids=cache_segment_ids,
                                 cache_layer=None if cache is None else j, train=train, rng=rng)
        moe_aux = moe_aux or a
    moe_aux = jax.tree.map(lambda v: v[None], moe_aux)
    return x, kv, standard_aux(moe_aux, [layer_id * per + per - 1] if moe_aux else [])


def blocks(layer_params, x: jax.Array, cfg: Config, *, positions, segment_ids=None, cache=None, train: bool = False,
           rng=None, layer_ids=None):
    """The units held on ``layer_params``' leading ``layers`` axis, in order, via ``lax.scan``.

    layer_ids: their global unit ids [units] (default 0..units-1; a pipeline stage passes its
    slice's). Each layer runs under ``jax.checkpoint`` with the ``cfg.remat`` policy. ``train``
    selects the training capacity factor and expert dropout, whose masks come from ``fold_in(rng,
    global index of the unit's MoE layer)``. With ``cache`` (``init_cache`` for these layers) the
    layers run one after another in a Python loop (see ``_cached_blocks``); while a
    ``models.capture`` is open too (taps cannot leave a scan). Returns (x, new cache or None, aux):
    aux['losses'] {"moe/loss"} and aux['metrics'] {"moe/<metric>/layer<i>"} with Switch layers. With
    ``attention='ring'`` and an active ring of more than one device (``mesh.context``) the layers run on
    the sequence in Ring Attention's balanced zigzag layout (``_zigzag_blocks``; x returns in order),
    unless ``ring_layout='contiguous'`` (the unbalanced baseline).
    """
    if cfg.attention == "ring" and cfg.ring_layout == "zigzag" and cache is None and ring_attention.needs_zigzag():
        return _zigzag_blocks(layer_params, x, cfg, positions=positions, segment_ids=segment_ids, train=train,
                              rng=rng, layer_ids=layer_ids)
    per = layers_per_unit(cfg)
    if cache is not None or capture.active():
        return _unrolled_blocks(layer_params, x, cfg, positions=positions, segment_ids=segment_ids, cache=cache,
                                train=train, rng=rng, layer_ids=layer_ids)
    ids = _ids(layer_ids, jax.tree.leaves(layer_params)[0].shape[0], concrete=bool(cfg.num_experts))

    def layer(h, p, i):
        key = None if rng is None else jax.random.fold_in(rng, i)
        out, _, aux = decoder_layer(p, h, cfg, positions=positions, segment_ids=segment_ids, train=train, rng=key)
        return out, aux

    layer = layers.remat(layer, cfg.remat, cfg.layer_unroll)

    def body(h, xs):  # one unit: its dense layers, then (with Switch layers) its MoE layer
        p_unit, uid = xs
        aux = {}
        for j, p in enumerate(unit_layers(p_unit, cfg)):
            h, aux = layer(h, p, uid if per == 1 else uid * per + j)
        return h, aux

    x, moe_aux = layers.layer_scan(body, x, (layer_params, jnp.asarray(ids, jnp.int32)), cfg.layer_unroll)
    return x, None, standard_aux(moe_aux, np.asarray(ids) * per + per - 1 if moe_aux else [])


def _zigzag_blocks(layer_params, x, cfg, *, positions, segment_ids, **kw):
    """``blocks`` with the sequence in Ring Attention's balanced zigzag layout: x, positions and
    segment ids are moved into it on entry and x back on exit (``parallel.ring_attention.zigzag``), so
    that under a causal mask every device of the ring does the same work."""
    with ring_attention.sequence_layout("zigzag"):
        x, kv, aux = blocks(layer_params, ring_attention.zigzag(x), cfg, positions=ring_attention.zigzag(positions),
                            segment_ids=ring_attention.zigzag(segment_ids), **kw)
    return ring_attention.unzigzag(x), kv, aux


def _unrolled_blocks(layer_params, x, cfg, *, positions, segment_ids, cache, train, rng, layer_ids):
    """``blocks`` one layer after another in a Python loop: cached decoding and ``capture``.

    ``layer_params`` is stacked (as ``init`` makes it) or a tuple of per-layer dicts in layer order
    (as ``decode_params`` makes it). With a cache, each layer writes only its new positions into the
    stacked cache ([layers of these units, ...]), in place: with per-layer weights nothing is sliced
    inside the loop (slicing stacked weights in a decode loop would copy each GEMM's weights on every
    step). MoE layers then run the dropless path (evaluation mode), so cached decoding equals the
    dropless full forward. Under ``capture`` every layer's input (and the last output) is tapped as
    "layer<i>" and its linears' inputs under "layer<i>/".
    """
    per = layers_per_unit(cfg)
    per_layer = layer_params if isinstance(layer_params, (list, tuple)) else _unstack(layer_params, cfg)
    ids = _ids(layer_ids, len(per_layer) // per)
    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    moe_aux, moe_index, index = [], [], 0
    for i, p in enumerate(per_layer):
        index = int(ids[i // per]) * per + i % per
        key = None if rng is None else jax.random.fold_in(rng, index)
        capture.hidden(index, x)
        with capture.layer(index):
            x, kv, a = decoder_layer(
                p, x, cfg, positions=positions, segment_ids=segment_ids, cache=kv, train=train, rng=key,
                cache_index=None if cache is None else cache["index"],
                cache_segment_ids=None if cache is None else cache["segment_ids"],
                cache_layer=None if cache is None else i)
        if a:
            moe_aux.append(a)
            moe_index.append(index)
    capture.hidden(index + 1, x)
    moe_aux = jax.tree.map(lambda *v: jnp.stack(v), *moe_aux) if moe_aux else {}
    return x, None if cache is None else {**cache, **kv}, standard_aux(moe_aux, moe_index)


def _unstack(layer_params: dict, cfg: Config) -> tuple:
    """Per-layer dicts in layer order from the stacked units."""
    units = jax.tree.leaves(layer_params)[0].shape[0]
    return tuple(p for u in range(units) for p in unit_layers(jax.tree.map(lambda a: a[u], layer_params), cfg))


def decode_params(params: dict, cfg: Config, fuse: bool = True, batch: int | None = None) -> dict:
    """``params`` with ``layers`` as a tuple of per-layer dicts, for cached decoding.

    ``models.generate`` calls this once, outside its decode loop, so each step reads every
    weight where it lies instead of slicing it out of the stacked array again. With ``fuse``,
    dense W_q, W_k, W_v become one ``wqkv`` [d_model, (heads + 2 kv_heads) head_dim] and, in
    dense layers, W_gate, W_up one ``w_gate_up`` [d_model, 2 d_ff]: one wider matmul each per
    step. Expert weights, and weights of a ``weights.Weight`` type that cannot join columns
    (``weights.join_out``), stay as they are. For ``batch`` 1, a layer that takes the six-kernel step also gets
    its four projections out-major (``decode_layer.out_major``).
    """
    per_layer = []
    for p in _unstack(params["layers"], cfg):  # fresh dicts: deleting leaves params alone
        p = dict(p)
        groups = (("wqkv", ("wq", "wk", "wv")),) + ((("w_gate_up", ("w_gate", "w_up")),) if "router" not in p else ())
        for fused, names in groups if fuse else ():
            joined = weights.join_out([p[n] for n in names])
            if joined is not None:
                p[fused] = joined
                for n in names:
                    del p[n]
        per_layer.append(decode_layer.out_major(p, cfg) if fuse and batch == 1 else p)
    return {**params, "layers": tuple(per_layer)}


def head(params: dict, x: jax.Array, cfg: Config) -> jax.Array:
    """Final RMSNorm and LM head: hidden [batch, seq, d_model] -> float32 logits [batch, seq, vocab]."""
    return layers.lm_head(params, x, cfg.norm_eps, cfg.tie_embeddings)


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache: k, v [n_layers, batch, max_len, kv_heads, head_dim]; segment 0 marks empty slots."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def cache_axes(cfg: Config) -> dict:
    """Logical axis names of ``init_cache``'s arrays (the cache's ``layers`` axis counts layers, not units)."""
    del cfg
    kv = ("layers", "batch", None, "kv_heads", "head_dim")
    return {"k": kv, "v": kv, "segment_ids": ("batch", None), "index": ()}


def apply(params: dict, tokens: jax.Array, cfg: Config, *, positions=None, segment_ids=None, cache=None,
          train: bool = False, rng=None, last_only: bool = False):
    """tokens [batch, seq] -> (float32 logits [batch, seq, vocab], aux) = head(blocks(embed(tokens))).

    positions [batch, seq] default to 0..seq-1 (offset by the cache index when decoding);
    segment_ids [batch, seq] (0 = padding) keep packed sequences apart. With ``cache`` the
    tokens are appended at ``cache['index']`` and ``aux['cache']`` is the updated cache.
    ``train``/``rng``: MoE training mode (see ``blocks``); aux['losses'], aux['metrics'] as ``blocks``.
    ``last_only``: logits of the last position only, [batch, 1, vocab] (a prefill needs no more).
    """
    b, s = tokens.shape
    start = cache["index"] if cache is not None else 0
    if positions is None:
        positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    if cache is not None:
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        cache = {**cache, "segment_ids": jax.lax.dynamic_update_slice_in_dim(
            cache["segment_ids"], segment_ids.astype(jnp.int32), start, axis=1)}
    x = embed(params, tokens, cfg)
    x, new_cache, aux = blocks(params["layers"], x, cfg, positions=positions, segment_ids=segment_ids,
                               cache=cache, train=train, rng=rng)
    if new_cache is not None:
        aux["cache"] = {**new_cache, "index": start + s}
    return head(params, x[:, -1:] if last_only else x, cfg), aux
