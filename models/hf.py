"""Hugging Face Llama-family interop: parameter and config mapping.

loom stores projections as [in, out] stacked over layers; Hugging Face stores
``nn.Linear`` weights as [out, in] per layer under ``model.layers.{i}.*``. Both sides
use the half-split rotary layout, so q/k weights map without permutation.
"""
from __future__ import annotations

import numpy as np

from models import transformer

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


def to_hf_state_dict(params: dict, cfg: transformer.Config) -> dict[str, np.ndarray]:
    """loom params -> Hugging Face Llama state dict of float32 NumPy arrays."""
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


def from_hf_state_dict(state: dict, cfg: transformer.Config) -> dict:
    """Hugging Face Llama state dict (NumPy arrays) -> loom params in ``cfg.param_dtype``."""
    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else np.float32

    def get(key):
        if key not in state:
            raise KeyError(f"checkpoint has no tensor {key!r}; is it a Llama-family model with "
                           f"{cfg.n_layers} layers?")
        return np.asarray(state[key], dtype)

    layers = {}
    for name, suffix in _LAYER_NAMES.items():
        per_layer = [get(f"model.layers.{i}.{suffix}") for i in range(cfg.n_layers)]
        layers[name] = np.stack([w.T if w.ndim == 2 else w for w in per_layer])
    params = {"embed": get("model.embed_tokens.weight"), "layers": layers,
              "final_norm": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["head"] = get("lm_head.weight").T
    return params
