"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights, then W8A8 int8 linears.

Smoothing (eq. 4): for a linear Y = X W whose input X [tokens, in] comes from an RMSNorm with scale g,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),     Y = (X diag(s)^-1) (diag(s) W)

(alpha default 0.5; max|W_j| over the output columns of every linear reading that input; both maxima
clamped at 1e-5). X diag(s)^-1 is folded into the norm (g_j / s_j) and diag(s) W into the weights, so the
smoothed float model computes the same function. In a Llama block the norms feed W_q, W_k, W_v (one s)
and W_gate, W_up (one s); in a Switch layer the MLP norm feeds the router (scaled too, kept in float)
and every expert's W_gate, W_up (one s, with max|W_j| over all experts). W_o and W_down, whose inputs come
from no norm, are quantized unsmoothed, as in the paper.

W8A8 (sec. 3 and table 2): int8 weights w_q = round(W / s_w) and int8 activations x_q = round(X / s_x),
Y = s_x s_w (x_q w_q) with the product an int8 x int8 -> int32 ``dot_general``. Weight scales per tensor
(the paper) or per output channel; activation scales per token (computed at run time: O1), per tensor
(dynamic: O2) or per tensor from calibration (static: O3). ``W8A8`` is a ``weights.Weight``, so the
quantized model runs through the family's own ``apply`` and ``models.generate``. LM head and embedding
stay in float, as in the paper.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import quant, weights

ACT_MODES = ("per_token", "per_tensor", "static")  # the paper's O1, O2, O3
LEVELS = {"O1": "per_token", "O2": "per_tensor", "O3": "static"}


@flax.struct.dataclass
class W8A8(weights.Weight):
    """int8 weight q [..., in, out]; w_scale float32 [...] (per tensor) or [..., 1, out] (per channel);
    a_scale float32 [...] (the static activation scale; 0 and unused for dynamic modes). Leading axes:
    layers, sublayers, experts. ``act``: one of ACT_MODES."""

    q: Any
    w_scale: Any
    a_scale: Any
    act: str = flax.struct.field(pytree_node=False, default="per_token")

    def dequantize(self) -> jax.Array:
        """The float32 weight s_w w_q [..., in, out]."""
        s = self.w_scale if self.w_scale.ndim == self.q.ndim else self.w_scale[..., None, None]
        return self.q.astype(jnp.float32) * s

    def num_params(self) -> int:
        return int(np.prod(self.q.shape))

    def _act_scale(self, x: jax.Array, dot: weights.Dot) -> jax.Array:
        if self.act == "per_token":
            return quant.absmax_scale(x, axis=-1)
        if self.act == "per_tensor":
            return quant.absmax_scale(x)
        if dot.form == "experts":
            return self.a_scale[:, None, None]  # [E] -> [E, 1, 1] against x [..., E, C, in]
        if dot.form == "ragged":  # rows sorted by expert: each row takes its expert's scale
            expert = jnp.searchsorted(jnp.cumsum(dot.group_sizes), jnp.arange(x.shape[0]), side="right")
            return jnp.take(self.a_scale, jnp.minimum(expert, self.a_scale.shape[0] - 1))[:, None]
        return self.a_scale

    def matmul(self, x, dot: weights.Dot):
        out_dtype = dot.out_dtype or x.dtype
        xf = x.astype(jnp.float32)
        experts = dot.form == "experts"
        sx = self._act_scale(xf, dot)
        xq = quant.symmetric(xf, sx)
        if dot.form == "ragged" or dot.transpose:
            # No integer grouped matmul here: the same int8 levels, multiplied in float32.
            return dot(xq.astype(jnp.float32) * sx, self.dequantize(), out_dtype=jnp.float32).astype(out_dtype)
        if experts:  # x [..., E, C, in], q [E, in, out]
            acc = jnp.einsum("...ecd,edf->...ecf", xq, self.q, preferred_element_type=jnp.int32)
            sw = self.w_scale[:, None, None] if self.w_scale.ndim == 1 else self.w_scale  # [E,1,1] | [E,1,out]
        else:
            acc = quant.int8_matmul(xq, self.q, (((xq.ndim - 1,), (0,)), ((), ())))
            sw = self.w_scale.reshape(-1) if self.w_scale.ndim else self.w_scale  # [out] | []
        return (acc.astype(jnp.float32) * sx * sw).astype(out_dtype)


# ----------------------------------------------------------------------------- layer bookkeeping

def _check_family(cfg) -> None:
    if not hasattr(cfg, "n_heads"):
        raise ValueError("SmoothQuant and AWQ here apply to the transformer family (RMSNorm before the "
                         "projections); this config is not one.")


def layer_slots(cfg) -> list[tuple[int, tuple, tuple]]:
    """[(global layer index i, path of its weight dict under params['layers'], index into the stacked leaves)]."""
    if not getattr(cfg, "num_experts", 0):
        return [(i, (), (i,)) for i in range(cfg.n_layers)]
    every, out = cfg.moe_every, []
    for i in range(cfg.n_layers):
        u, j = divmod(i, every)
        out.append((i, ("moe",), (u,)) if j == every - 1 else (i, ("dense",), (u, j)))
    return out


def global_ids(path: str, cfg, lead: tuple) -> np.ndarray:
    """Global layer index of every slice of a stacked leaf at ``path`` ('layers/...') with leading
    (layer-stack) shape ``lead`` ([L], [U, every-1] or [U])."""
    if not getattr(cfg, "num_experts", 0):
        return np.arange(lead[0])
    every = cfg.moe_every
    if "/dense/" in path:
        return (np.arange(lead[0])[:, None] * every + np.arange(lead[1])[None, :])
    return np.arange(lead[0]) * every + every - 1


def _host_layers(params) -> dict:
    """A writable float32 NumPy copy of params['layers']."""
    return jax.tree.map(lambda a: np.array(a, np.float32), params["layers"])


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), both clamped at 1e-5 (SmoothQuant eq. 4), float64."""
    x = np.maximum(np.asarray(x_absmax, np.float64), 1e-5)
    w = np.maximum(np.asarray(w_absmax, np.float64), 1e-5)
    return x ** alpha / w ** (1.0 - alpha)


def smooth(params: dict, cfg, stats: dict, alpha: float = 0.5) -> tuple[dict, dict]:
    """The smoothed params (same function in exact arithmetic) and the scales {"layer<i>/attn"|"layer<i>/mlp": s}.

    stats: ``quant.calibrate``'s statistics of the *unsmoothed* model. Switch layers: the MLP scale comes
    from the router's input statistics (every token) and max|W_j| over every expert's W_gate, W_up.
    """
    _check_family(cfg)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is {alpha}; SmoothQuant's migration strength lies in [0, 1].")
    lay = _host_layers(params)
    scales = {}
    for i, path, idx in layer_slots(cfg):
        d = lay
        for k in path:
            d = d[k]
        for part, norm, names in (("attn", "attn_norm", ("wq", "wk", "wv")), ("mlp", "mlp_norm", ("w_gate", "w_up"))):
            moe_mlp = part == "mlp" and "router" in d
            key = f"layer{i}/{'router' if moe_mlp else names[0]}"
            if key not in stats:
                raise ValueError(f"calibration statistics lack {key!r}; calibrate the same model (quant.calibrate).")
            ws = [d[n][idx] for n in names]  # [in, out] or experts [N, in, out]
            w_max = np.max([np.max(np.abs(w), axis=tuple(a for a in range(w.ndim) if a != w.ndim - 2)) for w in ws],
                           axis=0)
            s = smoothing_scales(stats[key]["absmax"], w_max, alpha)
            d[norm][idx] = (d[norm][idx] / s).astype(np.float32)
            for n in names:
                d[n][idx] = (d[n][idx] * s[:, None]).astype(np.float32)
            if moe_mlp:
                d["router"][idx] = (d["router"][idx] * s[:, None]).astype(np.float32)
            scales[f"layer{i}/{part}"] = s
    return {**params, "layers": jax.tree.map(jnp.asarray, lay)}, scales


def smoothed_stats(stats: dict, scales: dict) -> dict:
    """Calibration statistics of the smoothed model's linear inputs: max|X_j| / s_j where smoothing applied."""
    out = {}
    for key, st in stats.items():
        layer, _, name = key.partition("/")
        part = "attn" if name in ("wq", "wk", "wv") else "mlp" if name in ("w_gate", "w_up", "router") else None
        s = scales.get(f"{layer}/{part}")
        if s is not None:
            out[key] = {**st, "absmax": st["absmax"] / s, "mean_abs": st["mean_abs"] / s}
        else:
            out[key] = st
    return out


# ----------------------------------------------------------------------------- W8A8

@functools.partial(jax.jit, static_argnames=("per_channel", "experts"))
def quantize_weight(w: jax.Array, *, per_channel: bool, experts: bool) -> tuple[jax.Array, jax.Array]:
    """(int8 q, scale) of w [..., in, out]: scale per matrix [...] or per output channel [..., 1, out]."""
    del experts  # the same per-matrix rule over any leading axes
    w = jnp.asarray(w, jnp.float32)
    scale = quant.absmax_scale(w, axis=-2) if per_channel else quant.absmax_scale(w, axis=(-2, -1), keepdims=False)
    return quant.symmetric(w, scale if per_channel else scale[..., None, None]), scale


def is_block_linear(path: str, names) -> bool:
    """The projections inside the layers (W_q, W_k, W_v, W_o, W_gate, W_up, W_down, experts), not the router."""
    return path.startswith("layers/") and path.rsplit("/", 1)[-1] in ("wq", "wk", "wv", "wo", "w_gate", "w_up",
                                                                       "w_down")


def quantize(params: dict, axes: dict, cfg, *, act: str = "per_token", per_channel: bool = False,
             stats: dict | None = None) -> tuple[dict, dict]:
    """Every block projection as a ``W8A8`` weight -> (params, axes). ``act``: per_token (O1), per_tensor (O2)
    or static (O3, needs ``stats`` of the model being quantized: its linear inputs' abs-max)."""
    _check_family(cfg)
    act = LEVELS.get(act, act)
    if act not in ACT_MODES:
        raise ValueError(f"act is {act!r}; use one of {ACT_MODES} (or O1, O2, O3).")
    if act == "static" and stats is None:
        raise ValueError("static activation scales (O3) need calibration statistics; pass stats=.")

    def make(path, w, names):
        experts = "experts" in names
        lead = w.shape[:-2 - experts]
        q, sw = quantize_weight(w, per_channel=per_channel, experts=experts)
        a = np.zeros(w.shape[:-2], np.float32)
        if act == "static":
            name = path.rsplit("/", 1)[-1]
            for pos, i in np.ndenumerate(global_ids(path, cfg, lead)):
                am = stats[f"layer{i}/{name}"]["absmax"]  # [in] or [N, in]
                a[pos] = np.max(am, axis=-1) / quant.qmax(8)
        a_axes = tuple(names[:-2])
        w_axes = (*names[:-2], None, names[-1]) if per_channel else a_axes
        return W8A8(q, sw, jnp.asarray(a), act), W8A8(tuple(names), w_axes, a_axes, act)

    return weights.wrap(params, axes, make, is_block_linear)
