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
normed input, with the same residual add. Parameters then hold two stacks of whole layers,
``params['layers'] = {'dense': {...}, 'moe': {...}}`` (``dense`` absent when every layer is
MoE): ``dense`` as above over the dense layers, ``moe`` the attention weights and norms of
the MoE layers plus ``router`` [L_moe, d_model, N] and expert weights w_gate, w_up
[L_moe, N, d_model, d_ff], w_down [L_moe, N, d_ff, d_model]. ``blocks`` scans over
"superblocks" of ``moe_every`` layers (moe_every - 1 dense layers, then one MoE layer),
then runs any remaining dense layers; ``aux['moe']`` holds each MoE layer's metrics
(``moe.apply``'s aux, stacked [L_moe]). Training mode (``train=True``: the training
capacity factor, expert dropout keyed by ``rng`` and the layer index) is the train step's;
everything else runs in evaluation mode, and cached decoding always takes the dropless
path, so it equals the full forward with ``moe_dispatch='dropless'`` (a capacity-path forward
may drop tokens that decoding keeps). With ``num_experts == 0`` (the default) the model,
its parameters and its checkpoints are exactly the dense ones.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import models
from models import layers
from models import moe
from models.attention import IMPLEMENTATIONS, attention
from parallel.sharding import constrain

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only layer inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "save_qkv_mlp": jax.checkpoint_policies.save_only_these_names("qkv", "mlp_hidden"),
}


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
    attention: str = "auto"
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
        if self.head_dim == 0 and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.d_model // max(self.n_heads, 1))
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
    for name, choices in (("dtype", layers.DTYPES), ("param_dtype", layers.DTYPES),
                          ("remat", REMAT_POLICIES), ("attention", IMPLEMENTATIONS)):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"model.{name} is {getattr(cfg, name)!r}; use one of {sorted(choices)}.")
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

    With MoE the layers form the two stacks of the module docstring: attention weights, norms
    and the dense MLPs are those of the dense model with the same ``rng`` (its layers sorted
    into the stacks); routers and experts come from ``moe.init`` (truncated normal, std
    sqrt(0.1 / fan_in)).
    """
    pd = layers.DTYPES[cfg.param_dtype]
    D, V = cfg.d_model, cfg.vocab_size
    keys = jax.random.split(rng, len(ATTENTION_WEIGHTS + MLP_WEIGHTS) + 2)
    block = _stack(cfg, keys, cfg.n_layers)
    if cfg.num_experts:
        ids = moe_layer_ids(cfg)
        dense_ids = [i for i in range(cfg.n_layers) if i not in ids]
        experts = moe.init(cfg.moe, jax.random.fold_in(rng, 1), D, cfg.d_ff, len(ids), pd)
        block = {"moe": {**{k: v[jnp.array(ids)] for k, v in block.items() if k not in MLP_WEIGHTS}, **experts},
                 **({"dense": {k: v[jnp.array(dense_ids)] for k, v in block.items()}} if dense_ids else {})}
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
        if cfg.n_layers > len(moe_layer_ids(cfg)):
            stacks["dense"] = dense
        dense = stacks
    axes = {"embed": ("vocab", "embed"), "layers": dense, "final_norm": ("norm",)}
    if not cfg.tie_embeddings:
        axes["head"] = ("embed", "vocab")
    return axes


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
    # Gather the table over vocab first: a lookup into a vocab-split table would be rematerialised whole.
    table = constrain(params["embed"], (None, "embed"))
    x = layers.embed_lookup(table, tokens, cfg.compute_dtype)
    return constrain(x, ("batch", "seq", "embed"))


def block(p: dict, x: jax.Array, cfg: Config, *, positions, segment_ids=None, cache=None, cache_index=0,
          cache_segment_ids=None, cache_layer=None, train: bool = False, rng=None):
    """One decoder layer. p: one layer's slice of the stacked layers; x [batch, seq, d_model].

    With ``cache`` ({'k', 'v'}: [batch, max_len, kv_heads, head_dim]) the new keys and values
    are written at ``cache_index`` and attention reads the whole cache. With ``cache_layer``
    the cache holds every layer ([n_layers, batch, max_len, ...]) and only this layer's new
    positions are written, in place. A layer whose params hold a ``router`` is a Switch layer:
    ``train`` and ``rng`` (expert dropout) go to ``moe.apply``, and with a cache it runs the
    dropless path. Returns (x, new_cache or None, aux dict: the MoE metrics, {} when dense).
    """
    b, s, _ = x.shape
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    n = layers.rms_norm(x, p["attn_norm"], cfg.norm_eps)
    if "wqkv" in p:  # the fused decoding layout of ``decode_params``
        q, k, v = jnp.split(layers.linear(p["wqkv"], n), [q_dim, q_dim + kv_dim], axis=-1)
    else:
        q, k, v = (layers.linear(p[name], n) for name in ("wq", "wk", "wv"))
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
            k_all, v_all = new_cache["k"], new_cache["v"]
        else:
            start = (cache_layer, 0, cache_index, 0, 0)
            new_cache = {name: jax.lax.dynamic_update_slice(cache[name], t[None].astype(cache[name].dtype), start)
                         for name, t in (("k", k), ("v", v))}
            k_all, v_all = (jax.lax.dynamic_index_in_dim(new_cache[n], cache_layer, 0, keepdims=False) for n in "kv")
        o = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), implementation=cfg.attention,
                      q_segment_ids=segment_ids, kv_segment_ids=cache_segment_ids, q_start=cache_index)
    x = x + layers.linear(p["wo"], o.reshape(b, s, cfg.n_heads * cfg.head_dim))
    x = constrain(x, ("batch", "seq", "embed"))
    n = layers.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    if "router" in p:
        mcfg = cfg.moe if cache is None else dataclasses.replace(cfg.moe, dispatch="dropless")
        y, aux = moe.apply({name: p[name] for name in ("router", *moe.EXPERT_WEIGHTS)}, n, mcfg, train=train,
                           rng=rng)
        return constrain(x + y, ("batch", "seq", "embed")), new_cache, aux
    if "w_gate_up" in p:
        gate, up = jnp.split(layers.linear(p["w_gate_up"], n), [cfg.d_ff], axis=-1)
    else:
        gate, up = layers.linear(p["w_gate"], n), layers.linear(p["w_up"], n)
    hidden = jax.nn.silu(gate) * up
    hidden = checkpoint_name(constrain(hidden, ("batch", "seq", "mlp")), "mlp_hidden")
    x = x + layers.linear(p["w_down"], hidden)
    return constrain(x, ("batch", "seq", "embed")), new_cache, {}


def blocks(layer_params: dict, x: jax.Array, cfg: Config, *, positions, segment_ids=None, cache=None,
           capture_hidden: bool = False, train: bool = False, rng=None):
    """All layers via ``lax.scan`` over the stacked ``layers`` axis (superblocks of ``moe_every`` with MoE).

    Returns (x, new_cache, aux). ``aux['hidden_states']`` [n_layers + 1, batch, seq, d_model]
    holds every layer's input and the last layer's output when ``capture_hidden``. With MoE,
    ``aux['moe']`` maps each metric of ``moe.apply`` (aux_loss and z_loss already scaled by
    their coefficients, dropped_fraction, load_min, load_max, load_entropy) to a float32
    [n_moe_layers] array, in the order of ``moe_layer_ids``. ``train`` selects the training
    capacity factor and expert dropout, whose masks come from ``fold_in(rng, layer index)``.
    """
    if cache is not None:
        return _cached_blocks(layer_params, x, cfg, positions=positions, segment_ids=segment_ids, cache=cache,
                              capture_hidden=capture_hidden)

    def layer(h, p, i):
        key = None if rng is None else jax.random.fold_in(rng, i)
        out, _, aux = block(p, h, cfg, positions=positions, segment_ids=segment_ids, train=train, rng=key)
        return out, aux

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)

    def dense_body(h, xs):
        p, i = xs
        out, aux = layer(h, p, i)
        return out, ({**aux, "hidden_states": h} if capture_hidden else aux)

    if not cfg.num_experts:
        x, aux = jax.lax.scan(dense_body, x, (layer_params, jnp.arange(cfg.n_layers)))
        if capture_hidden:
            aux["hidden_states"] = jnp.concatenate([aux["hidden_states"], x[None]], axis=0)
        return x, None, aux

    every, n_moe = cfg.moe_every, len(moe_layer_ids(cfg))
    dense = layer_params.get("dense", {})
    head_dense = jax.tree.map(lambda a: a[:n_moe * (every - 1)].reshape(n_moe, every - 1, *a.shape[1:]), dense)

    def super_body(h, xs):  # moe_every - 1 dense layers, then one MoE layer
        pd, pm, s = xs
        hidden = []
        for j in range(every - 1):
            hidden.append(h)
            h, _ = layer(h, jax.tree.map(lambda a, j=j: a[j], pd), s * every + j)
        hidden.append(h)
        h, aux = layer(h, pm, s * every + every - 1)
        return h, ({"moe": aux, "hidden_states": jnp.stack(hidden)} if capture_hidden else {"moe": aux})

    x, aux = jax.lax.scan(super_body, x, (head_dense, layer_params["moe"], jnp.arange(n_moe)))
    hidden = [aux.pop("hidden_states").reshape(n_moe * every, *x.shape)] if capture_hidden else []
    n_tail = cfg.n_layers - n_moe * every
    if n_tail:  # dense layers after the last MoE layer
        tail = jax.tree.map(lambda a: a[n_moe * (every - 1):], dense)
        x, tail_aux = jax.lax.scan(dense_body, x, (tail, n_moe * every + jnp.arange(n_tail)))
        hidden += [tail_aux["hidden_states"]] if capture_hidden else []
    if capture_hidden:
        aux["hidden_states"] = jnp.concatenate([*hidden, x[None]], axis=0)
    return x, None, aux


def _cached_blocks(layer_params, x, cfg, *, positions, segment_ids, cache, capture_hidden):
    """``blocks`` with a KV cache, one layer after another in a Python loop.

    ``layer_params`` is stacked (as ``init`` makes it) or a tuple of per-layer dicts (as
    ``decode_params`` makes it). Each layer writes only its new positions into the stacked
    cache, in place. With per-layer weights nothing is sliced inside the loop: slicing stacked
    weights in a decode loop would copy each GEMM's weights on every step. MoE layers run
    the dropless path (evaluation mode), so cached decoding equals the dropless full forward.
    """
    per_layer = layer_params if isinstance(layer_params, (list, tuple)) else _unstack(layer_params, cfg)
    kv, hidden, moe_aux = {"k": cache["k"], "v": cache["v"]}, [], []
    for i, p in enumerate(per_layer):
        hidden.append(x)
        x, kv, layer_aux = block(p, x, cfg, positions=positions, segment_ids=segment_ids, cache=kv,
                                 cache_index=cache["index"], cache_segment_ids=cache["segment_ids"], cache_layer=i)
        if layer_aux:
            moe_aux.append(layer_aux)
    aux = {"hidden_states": jnp.stack(hidden + [x])} if capture_hidden else {}
    if moe_aux:
        aux["moe"] = jax.tree.map(lambda *a: jnp.stack(a), *moe_aux)
    return x, {**cache, **kv}, aux


def _unstack(layer_params: dict, cfg: Config) -> tuple:
    """Per-layer dicts in layer order from the stacked layers (both stacks interleaved with MoE)."""
    def split(stack, n):
        return [jax.tree.map(lambda a, i=i: a[i], stack) for i in range(n)]

    if not cfg.num_experts:
        return tuple(split(layer_params, cfg.n_layers))
    ids = moe_layer_ids(cfg)
    moe_layers = iter(split(layer_params["moe"], len(ids)))
    dense_layers = iter(split(layer_params.get("dense", {}), cfg.n_layers - len(ids)))
    return tuple(next(moe_layers) if i in ids else next(dense_layers) for i in range(cfg.n_layers))


def decode_params(params: dict, cfg: Config, fuse: bool = True) -> dict:
    """``params`` with ``layers`` as a tuple of per-layer dicts, for cached decoding.

    ``models.generate`` calls this once, outside its decode loop, so each step reads every
    weight where it lies instead of slicing it out of the stacked array again. With ``fuse``,
    dense W_q, W_k, W_v become one ``wqkv`` [d_model, (heads + 2 kv_heads) head_dim] and, in
    dense layers, W_gate, W_up one ``w_gate_up`` [d_model, 2 d_ff]: one wider matmul each per
    step. Expert weights stay as they are.
    """
    per_layer = []
    for p in _unstack(params["layers"], cfg):  # fresh dicts: popping leaves params alone
        dense_mlp = "router" not in p
        if fuse and all(isinstance(p[n], jax.Array) for n in ("wq", "wk", "wv") + ("w_gate", "w_up") * dense_mlp):
            p["wqkv"] = jnp.concatenate([p.pop("wq"), p.pop("wk"), p.pop("wv")], axis=1)
            if dense_mlp:
                p["w_gate_up"] = jnp.concatenate([p.pop("w_gate"), p.pop("w_up")], axis=1)
        per_layer.append(p)
    return {**params, "layers": tuple(per_layer)}


def head(params: dict, x: jax.Array, cfg: Config) -> jax.Array:
    """Final RMSNorm and LM head: hidden [batch, seq, d_model] -> float32 logits [batch, seq, vocab]."""
    x = layers.rms_norm(x, params["final_norm"], cfg.norm_eps)
    w = params["embed"].T if cfg.tie_embeddings else params["head"]
    return constrain(layers.linear(w, x, out_dtype=jnp.float32), ("batch", "seq", "vocab"))


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
    """Logical axis names of ``init_cache``'s arrays."""
    del cfg
    kv = ("layers", "batch", None, "kv_heads", "head_dim")
    return {"k": kv, "v": kv, "segment_ids": ("batch", None), "index": ()}


def apply(params: dict, tokens: jax.Array, cfg: Config, *, positions=None, segment_ids=None, cache=None,
          capture_hidden: bool = False, train: bool = False, rng=None):
    """tokens [batch, seq] -> (float32 logits [batch, seq, vocab], aux).

    positions [batch, seq] default to 0..seq-1 (offset by the cache index when decoding);
    segment_ids [batch, seq] (0 = padding) keep packed sequences apart. With ``cache`` the
    tokens are appended at ``cache['index']`` and ``aux['cache']`` is the updated cache.
    ``train``/``rng``: MoE training mode (see ``blocks``); ``aux['moe']``: per-layer MoE metrics.
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
                               cache=cache, capture_hidden=capture_hidden, train=train, rng=rng)
    if new_cache is not None:
        aux["cache"] = {**new_cache, "index": start + s}
    return head(params, x, cfg), aux
