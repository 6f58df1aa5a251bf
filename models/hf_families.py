"""Hugging Face model families: for Llama-family and Mamba checkpoints, the config.json fields,
the tensor names and the state-dict maps to and from loom's parameters.

loom stores projections as [in, out] stacked over layers; Hugging Face stores
``nn.Linear`` weights as [out, in] per layer under ``model.layers.{i}.*`` (Llama) or
``backbone.layers.{i}.*`` (Mamba). Both sides use the half-split rotary layout, so q/k
weights map without permutation. Mamba's fused ``in_proj`` [2 d_inner, d_model] is loom's
``in_x`` and ``in_z`` halves, and its conv1d weight [d_inner, 1, d_conv] is loom's
``conv_w`` [d_conv, d_inner]. Which family a function handles follows the Config's type
(`family`); a new family adds its maps here and one `Family` entry in ``FAMILIES``.
Reading and writing checkpoint directories is `models.hf`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from models import layers, mamba, transformer

# loom name in params['layers'] -> Hugging Face suffix under model.layers.{i}.
_LAYER_NAMES = {
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
}


def llama_config(cfg: transformer.Config) -> dict:
    """config.json fields of a ``LlamaForCausalLM`` equal to ``cfg``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _refuse_moe(cfg: transformer.Config) -> None:
    if cfg.num_experts:
        raise ValueError(f"model.num_experts is {cfg.num_experts}: Switch (MoE) models have no Llama checkpoint "
                         "format; only dense Transformers and Mamba models convert.")


def _llama_to_hf_state_dict(params: dict, cfg: transformer.Config) -> dict[str, np.ndarray]:
    _refuse_moe(cfg)
    out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
           "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
    for name, suffix in _LAYER_NAMES.items():
        stacked = np.asarray(params["layers"][name], np.float32)
        for i in range(cfg.n_layers):
            w = stacked[i]
            out[f"model.layers.{i}.{suffix}"] = w.T if w.ndim == 2 else w
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["head"], np.float32).T
    return out


def _llama_from_hf_state_dict(state: dict, cfg: transformer.Config) -> dict:
    _refuse_moe(cfg)
    dtype = np.dtype(layers.DTYPES[cfg.param_dtype])

    def get(key):
        if key not in state:
            raise KeyError(f"checkpoint has no tensor {key!r}; is it a Llama-family model with "
                           f"{cfg.n_layers} layers?")
        return np.asarray(state[key], dtype)

    block = {}
    for name, suffix in _LAYER_NAMES.items():
        per_layer = [get(f"model.layers.{i}.{suffix}") for i in range(cfg.n_layers)]
        block[name] = np.stack([w.T if w.ndim == 2 else w for w in per_layer])
    return _lm_params(get, cfg, block, "model.embed_tokens.weight", "model.norm.weight")


def _lm_params(get, cfg, layers: dict, embed: str, norm: str) -> dict:
    """loom's params around the stacked ``layers``: the embedding, final norm and (untied) head by HF name."""
    params = {"embed": get(embed), "layers": layers, "final_norm": get(norm)}
    if not cfg.tie_embeddings:
        params["head"] = get("lm_head.weight").T
    return params


def _lm_names(cfg, embed: str, norm: str, layer_prefix: str, layer_names) -> list[str]:
    """Every HF tensor name of a checkpoint: embedding, final norm, each layer's, and the untied head."""
    names = [embed, norm] + [f"{layer_prefix}.{i}.{s}" for s in layer_names for i in range(cfg.n_layers)]
    return names + ([] if cfg.tie_embeddings else ["lm_head.weight"])


def _llama_names(cfg: transformer.Config) -> list[str]:
    return _lm_names(cfg, "model.embed_tokens.weight", "model.norm.weight", "model.layers", _LAYER_NAMES.values())


def _llama_shapes(cfg: transformer.Config) -> dict[str, tuple[int, ...]]:
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = {"wq": (q, D), "wk": (kv, D), "wv": (kv, D), "wo": (D, q), "w_gate": (F, D), "w_up": (F, D),
             "w_down": (D, F), "attn_norm": (D,), "mlp_norm": (D,)}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    shapes.update({f"model.layers.{i}.{suffix}": layer[name] for name, suffix in _LAYER_NAMES.items()
                   for i in range(cfg.n_layers)})
    return {name: shapes[name] for name in _llama_names(cfg)}


# ----------------------------------------------------------------------------- config

def _check_types(c: dict, integers=(), numbers=(), booleans=()) -> None:
    """ValueError naming the config.json key whose value is not of its JSON type (absent or null is fine)."""
    for keys, ok, kind in ((integers, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
                           (numbers, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
                           (booleans, lambda v: isinstance(v, bool), "true or false")):
        for key in keys:
            if c.get(key) is not None and not ok(c[key]):
                raise ValueError(f"config.json {key} is {c[key]!r}; it must be {kind}.")


# Families whose checkpoints have exactly the Llama layout and math (no biases, SwiGLU, RMSNorm).
_MODEL_TYPES = {"llama", "mistral"}
_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}


def config_from_hf(hf_config: dict, **overrides) -> transformer.Config | mamba.Config:
    """loom Config from a Llama-family or Mamba config.json dict; ``overrides`` set any other Config field.

    model_type 'mamba' gives a ``mamba.Config`` (``mamba_config_from_hf``). For Llama, reads the
    rope theta from ``rope_parameters`` (transformers 5), or ``rope_theta`` beside a
    ``rope_scaling`` dict (earlier versions). Raises ValueError, naming the field, for other
    architectures, biases, sliding windows, activations other than SiLU and rope scaling.
    """
    c = hf_config
    model_type = c.get("model_type")
    if model_type == "mamba":
        return mamba_config_from_hf(c, **overrides)
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"config.json model_type is {model_type!r}; loom loads only "
                         f"{sorted(_MODEL_TYPES | {'mamba'})}.")
    bad_arch = [a for a in c.get("architectures") or [] if a not in _ARCHITECTURES]
    if bad_arch:
        raise ValueError(f"config.json architectures holds {bad_arch[0]!r}; loom loads only {sorted(_ARCHITECTURES)}.")
    for field in ("attention_bias", "mlp_bias"):
        if c.get(field):
            raise ValueError(f"config.json {field} is true; loom's Llama layers have no biases.")
    if c.get("sliding_window") is not None:
        raise ValueError(f"config.json sliding_window is {c['sliding_window']}; loom implements full causal "
                         "attention only (set it to null if the model never uses the window).")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act is {c['hidden_act']!r}; loom's SwiGLU MLP uses 'silu'.")
    rope = dict(c.get("rope_parameters") or {})
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    for field in ("rope_parameters", "rope_scaling"):
        spec = c.get(field) or {}
        kind = spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, dict) else spec
        if kind != "default":
            raise ValueError(f"config.json {field} has rope type {kind!r}; loom implements only the default "
                             "(unscaled) rotary embedding.")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if c.get(k) is None]
    if missing:
        raise ValueError(f"config.json has no {missing[0]}; it is required for a Llama model.")
    _check_types(c, integers=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim"),
                 numbers=("rope_theta", "rms_norm_eps"), booleans=("tie_word_embeddings",))
    _check_types({f"rope_parameters.{k}": v for k, v in rope.items()}, numbers=("rope_parameters.rope_theta",))
    heads = c["num_attention_heads"]
    values = dict(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], d_ff=c["intermediate_size"],
        n_layers=c["num_hidden_layers"], n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, rope_theta=float(theta),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    return transformer.Config(**{**values, **overrides})


# ----------------------------------------------------------------------------- Mamba

_MAMBA_ARCHITECTURES = {"MambaForCausalLM"}


def mamba_config(cfg: mamba.Config) -> dict:
    """config.json fields of a ``MambaForCausalLM`` equal to ``cfg`` (residual_in_fp32 is True there:
    loom's residual stream is in ``cfg.dtype``, the same thing in float32)."""
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_inner,
        "state_size": cfg.d_state,
        "num_hidden_layers": cfg.n_layers,
        "expand": cfg.expand,
        "conv_kernel": cfg.d_conv,
        "time_step_rank": cfg.dt_rank,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "layer_norm_epsilon": cfg.norm_eps,
        "use_bias": cfg.proj_bias,
        "use_conv_bias": cfg.conv_bias,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def mamba_config_from_hf(hf_config: dict, **overrides) -> mamba.Config:
    """``mamba.Config`` from a Mamba config.json dict (transformers' ``MambaConfig`` fields and defaults).

    Raises ValueError, naming the field, for other architectures, activations other than SiLU,
    a non-integer ``expand`` or an ``intermediate_size`` other than expand * hidden_size.
    """
    c = hf_config
    bad_arch = [a for a in c.get("architectures") or [] if a not in _MAMBA_ARCHITECTURES]
    if bad_arch:
        raise ValueError(f"config.json architectures holds {bad_arch[0]!r}; loom loads only "
                         f"{sorted(_MAMBA_ARCHITECTURES)} for model_type 'mamba'.")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act is {c['hidden_act']!r}; loom's Mamba mixer uses 'silu'.")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers") if c.get(k) is None]
    if missing:
        raise ValueError(f"config.json has no {missing[0]}; it is required for a Mamba model.")
    _check_types(c, integers=("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel",
                              "intermediate_size"),
                 numbers=("time_step_min", "time_step_max", "time_step_floor", "layer_norm_epsilon"),
                 booleans=("tie_word_embeddings", "use_bias", "use_conv_bias"))
    if c.get("time_step_rank", "auto") != "auto":
        _check_types(c, integers=("time_step_rank",))
    expand = c.get("expand", 2)
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or expand != int(expand):
        raise ValueError(f"config.json expand is {expand!r}; loom's Mamba needs an integer expansion factor.")
    expand, hidden = int(expand), c["hidden_size"]
    if c.get("intermediate_size") not in (None, expand * hidden):
        raise ValueError(f"config.json intermediate_size is {c['intermediate_size']}, not expand * hidden_size "
                         f"= {expand * hidden}; loom's Mamba derives it from expand.")
    rank = c.get("time_step_rank", "auto")
    values = dict(
        vocab_size=c["vocab_size"], d_model=hidden, n_layers=c["num_hidden_layers"],
        d_state=c.get("state_size", 16), d_conv=c.get("conv_kernel", 4), expand=expand,
        dt_rank=0 if rank == "auto" else rank, dt_min=float(c.get("time_step_min", 0.001)),
        dt_max=float(c.get("time_step_max", 0.1)), dt_init_floor=float(c.get("time_step_floor", 1e-4)),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        proj_bias=bool(c.get("use_bias", False)), conv_bias=bool(c.get("use_conv_bias", True)))
    return mamba.Config(**{**values, **overrides})


def _mamba_layer_names(cfg: mamba.Config) -> list[str]:
    """Tensor suffixes under ``backbone.layers.{i}.`` of a Mamba layer of ``cfg``."""
    names = ["norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.x_proj.weight",
             "mixer.dt_proj.weight", "mixer.dt_proj.bias", "mixer.A_log", "mixer.D", "mixer.out_proj.weight"]
    names += ["mixer.conv1d.bias"] if cfg.conv_bias else []
    return names + (["mixer.in_proj.bias", "mixer.out_proj.bias"] if cfg.proj_bias else [])


def _mamba_to_hf_state_dict(params: dict, cfg: mamba.Config) -> dict[str, np.ndarray]:
    block = {k: np.asarray(v, np.float32) for k, v in params["layers"].items()}
    out = {"backbone.embeddings.weight": np.asarray(params["embed"], np.float32)}
    for i in range(cfg.n_layers):
        p = {k: v[i] for k, v in block.items()}
        layer = {
            "norm.weight": p["norm"],
            "mixer.in_proj.weight": np.concatenate([p["in_x"].T, p["in_z"].T]),  # [2E, D]
            "mixer.conv1d.weight": p["conv_w"].T[:, None, :],  # [E, 1, K]
            "mixer.x_proj.weight": p["x_proj"].T,
            "mixer.dt_proj.weight": p["dt_proj"].T,
            "mixer.dt_proj.bias": p["dt_bias"],
            "mixer.A_log": p["A_log"],
            "mixer.D": p["D"],
            "mixer.out_proj.weight": p["out_proj"].T,
        }
        if cfg.conv_bias:
            layer["mixer.conv1d.bias"] = p["conv_b"]
        if cfg.proj_bias:
            layer["mixer.in_proj.bias"] = np.concatenate([p["in_x_bias"], p["in_z_bias"]])
            layer["mixer.out_proj.bias"] = p["out_bias"]
        out.update({f"backbone.layers.{i}.{k}": np.ascontiguousarray(v) for k, v in layer.items()})
    out["backbone.norm_f.weight"] = np.asarray(params["final_norm"], np.float32)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["head"], np.float32).T)
    return out


def _mamba_from_hf_state_dict(state: dict, cfg: mamba.Config) -> dict:
    dtype = np.dtype(layers.DTYPES[cfg.param_dtype])
    E = cfg.d_inner

    def get(key):
        if key not in state:
            raise KeyError(f"checkpoint has no tensor {key!r}; is it a Mamba model with {cfg.n_layers} layers?")
        return np.asarray(state[key], dtype)

    per_layer: dict[str, list] = {}
    for i in range(cfg.n_layers):
        g = lambda suffix: get(f"backbone.layers.{i}.{suffix}")  # noqa: E731
        in_proj = g("mixer.in_proj.weight")
        if in_proj.shape[0] != 2 * E:
            raise ValueError(f"backbone.layers.{i}.mixer.in_proj.weight has shape {in_proj.shape}, but config.json "
                             f"implies ({2 * E}, {cfg.d_model}).")
        layer = {
            "norm": g("norm.weight"), "in_x": in_proj[:E].T, "in_z": in_proj[E:].T,
            "conv_w": g("mixer.conv1d.weight")[:, 0, :].T, "x_proj": g("mixer.x_proj.weight").T,
            "dt_proj": g("mixer.dt_proj.weight").T, "dt_bias": g("mixer.dt_proj.bias"),
            "A_log": g("mixer.A_log"), "D": g("mixer.D"), "out_proj": g("mixer.out_proj.weight").T,
        }
        if cfg.conv_bias:
            layer["conv_b"] = g("mixer.conv1d.bias")
        if cfg.proj_bias:
            in_bias = g("mixer.in_proj.bias")
            layer.update(in_x_bias=in_bias[:E], in_z_bias=in_bias[E:], out_bias=g("mixer.out_proj.bias"))
        for k, v in layer.items():
            per_layer.setdefault(k, []).append(v)
    return _lm_params(get, cfg, {k: np.stack(v) for k, v in per_layer.items()}, "backbone.embeddings.weight",
                      "backbone.norm_f.weight")


def _mamba_names(cfg: mamba.Config) -> list[str]:
    return _lm_names(cfg, "backbone.embeddings.weight", "backbone.norm_f.weight", "backbone.layers",
                     _mamba_layer_names(cfg))


def _mamba_shapes(cfg: mamba.Config) -> dict[str, tuple[int, ...]]:
    D, E, N, R, K, V = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv, cfg.vocab_size
    layer = {"norm.weight": (D,), "mixer.in_proj.weight": (2 * E, D), "mixer.conv1d.weight": (E, 1, K),
             "mixer.x_proj.weight": (R + 2 * N, E), "mixer.dt_proj.weight": (E, R), "mixer.dt_proj.bias": (E,),
             "mixer.A_log": (E, N), "mixer.D": (E,), "mixer.out_proj.weight": (D, E), "mixer.conv1d.bias": (E,),
             "mixer.in_proj.bias": (2 * E,), "mixer.out_proj.bias": (D,)}
    shapes = {"backbone.embeddings.weight": (V, D), "backbone.norm_f.weight": (D,), "lm_head.weight": (V, D)}
    shapes.update({f"backbone.layers.{i}.{s}": layer[s] for s in _mamba_layer_names(cfg) for i in range(cfg.n_layers)})
    return {name: shapes[name] for name in _mamba_names(cfg)}


# ----------------------------------------------------------------------------- families

class Family(NamedTuple):
    """What checkpoint conversion needs of one model family; ``FAMILIES`` maps its Config type to it."""
    name: str  # in messages: "Llama" or "Mamba"
    module: Any  # the loom model family (its ``init`` gives the expected shapes)
    hf_config: Callable  # Config -> config.json fields
    names: Callable  # Config -> every tensor name a checkpoint holds, in order
    shapes: Callable  # Config -> {tensor name: its shape in a checkpoint}
    to_hf: Callable  # (params, Config) -> state dict
    from_hf: Callable  # (state dict, Config) -> params


def family(cfg: transformer.Config | mamba.Config) -> Family:
    """The conversion maps of ``cfg``'s model family."""
    if type(cfg) not in FAMILIES:
        raise TypeError(f"no Hugging Face format for a {type(cfg).__module__}.{type(cfg).__name__}; "
                        f"known: {', '.join(f.name for f in FAMILIES.values())}.")
    return FAMILIES[type(cfg)]


def to_hf_state_dict(params: dict, cfg: transformer.Config | mamba.Config) -> dict[str, np.ndarray]:
    """loom params -> Hugging Face Llama (or Mamba, for a ``mamba.Config``) state dict of float32 NumPy arrays."""
    return family(cfg).to_hf(params, cfg)


def from_hf_state_dict(state: dict, cfg: transformer.Config | mamba.Config) -> dict:
    """Hugging Face Llama (or Mamba, for a ``mamba.Config``) state dict (NumPy arrays) -> loom params in
    ``cfg.param_dtype``."""
    return family(cfg).from_hf(state, cfg)


def hf_shapes(cfg: transformer.Config | mamba.Config) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a Llama (or Mamba) checkpoint of ``cfg`` holds, by name."""
    return family(cfg).shapes(cfg)


def hf_names(cfg: transformer.Config | mamba.Config) -> list[str]:
    """Every tensor name a Llama (or Mamba) checkpoint of ``cfg`` must hold, in order."""
    return family(cfg).names(cfg)


FAMILIES = {
    transformer.Config: Family("Llama", transformer, llama_config, _llama_names, _llama_shapes,
                               _llama_to_hf_state_dict, _llama_from_hf_state_dict),
    mamba.Config: Family("Mamba", mamba, mamba_config, _mamba_names, _mamba_shapes, _mamba_to_hf_state_dict,
                         _mamba_from_hf_state_dict),
}
